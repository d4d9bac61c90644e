#pragma once
/// @file
/// 8-bit storage for KV caches: `attn::q8_0`, llama.cpp's q8_0 format. A row is cut into
/// blocks of 32 values; a block stores one scale (IEEE half) and 32 signed 8-bit integers,
/// value ≈ scale·q with scale = max |value| / 127 and q = round(value / scale): 34 bytes
/// for 32 values, 0.27 of float's. Symmetric rounding to nearest, as llama.cpp does; the
/// error of a value is at most half its block's scale (1/254 of the block's largest
/// magnitude, plus the scale's own half rounding). A block holding a NaN or an infinity, or
/// a magnitude past 127·65504 (where the half scale overflows), gets a NaN scale: all its
/// values read back as NaN, so that what cannot be stored is never read as a finite
/// number. The tiled kernel reads q8_0 straight from the cache (`detail::QuantizedRows`),
/// converting in registers (a decode step) or a tile at a time into float scratch, and
/// computes in float.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "precision.hpp"

namespace attn {

/// The q8_0 storage format (see the file comment): the `Storage` of `KVCache<q8_0>`.
struct q8_0 {
  /// Values sharing one scale.
  static constexpr Eigen::Index block_size = 32;
  /// Scales a row of `width` values needs (its last block may be short).
  static constexpr Eigen::Index blocks(Eigen::Index width) noexcept { return (width + block_size - 1) / block_size; }
};

/// Rounds a row of float values (a row or column vector expression of any length) to
/// q8_0: `quants` (its length) and `scales` (q8_0::blocks of its length).
template <typename Row>
void quantize_q8_0(const Eigen::MatrixBase<Row>& row, std::int8_t* quants, Eigen::half* scales) noexcept {
  static_assert(std::is_same_v<typename Row::Scalar, float>, "attn::quantize_q8_0 rounds float values");
  const Eigen::Index width = row.size();
  for (Eigen::Index first = 0, block = 0; first < width; first += q8_0::block_size, ++block) {
    const Eigen::Index count = std::min(q8_0::block_size, width - first);
    float largest = 0.0f;
    bool finite = true;
    for (Eigen::Index i = 0; i < count; ++i) {
      const float value = row(first + i);
      finite = finite && std::isfinite(value);
      largest = std::max(largest, std::abs(value));
    }
    const Eigen::half scale(largest / 127.0f);
    if (!finite || !Eigen::numext::isfinite(scale)) {
      scales[block] = Eigen::half(std::numeric_limits<float>::quiet_NaN());
      std::fill(quants + first, quants + first + count, std::int8_t(0));
      continue;
    }
    scales[block] = scale;
    // Divided by the stored (rounded) scale, so that q·scale is the nearest value the
    // block can hold; rounding the scale down can take q one past 127, hence the clamp.
    const float inverse = static_cast<float>(scale) == 0.0f ? 0.0f : 1.0f / static_cast<float>(scale);
    for (Eigen::Index i = 0; i < count; ++i) {
      const float q = std::clamp(std::nearbyint(row(first + i) * inverse), -127.0f, 127.0f);
      quants[first + i] = static_cast<std::int8_t>(q);
    }
  }
}

/// Reads `width` q8_0 values back into float: to[i] = scale of i's block · quants[i].
inline void dequantize_q8_0(const std::int8_t* quants, const Eigen::half* scales, Eigen::Index width,
                            float* to) noexcept {
  for (Eigen::Index i = 0; i < width; ++i) {
    to[i] = static_cast<float>(scales[i / q8_0::block_size]) * static_cast<float>(quants[i]);
  }
}

namespace detail {

template <>
struct compute_scalar<q8_0> {
  using type = float;
};

/// Rows of a head-major q8_0 store as the tiled kernel reads them: two head-major stores
/// of the same tokens, the quants (one head's width per row) and their blocks' scales
/// (q8_0::blocks of it per row).
struct QuantizedRows {
  using Scalar = q8_0;
  static constexpr bool IsRowMajor = true;

  HeadMajorRows<std::int8_t> quants;
  HeadMajorRows<Eigen::half> scales;

  Eigen::Index rows() const noexcept { return quants.rows(); }
  Eigen::Index cols() const noexcept { return quants.cols(); }
};

/// Row `row` of head `head` (see `QuantizedRows`), as float.
inline void dequantize_row(const QuantizedRows& rows, Eigen::Index head, Eigen::Index row, float* to) noexcept {
  dequantize_q8_0(rows.quants.row(head, row), rows.scales.row(head, row), rows.quants.width, to);
}

/// One packet of Eigen's float SIMD from q8_0 quants at `quants`, before their block's
/// scale: the conversion in registers of a decode step (`load_float_packet` for 8 bits).
EIGEN_ALWAYS_INLINE Eigen::internal::packet_traits<float>::type load_float_packet(const std::int8_t* quants) noexcept {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quants))));
#elif defined(EIGEN_VECTORIZE_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(quants))));
#else
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int size = Eigen::internal::packet_traits<float>::size;
  alignas(64) float converted[size];
  for (int i = 0; i < size; ++i) converted[i] = static_cast<float>(quants[i]);
  return Eigen::internal::pload<Packet>(converted);
#endif
}

/// The same, times `scale`.
EIGEN_ALWAYS_INLINE Eigen::internal::packet_traits<float>::type load_float_packet(const std::int8_t* quants,
                                                                                  float scale) noexcept {
  using Packet = Eigen::internal::packet_traits<float>::type;
  return Eigen::internal::pmul(Eigen::internal::pset1<Packet>(scale), load_float_packet(quants));
}

/// A q8_0 store is taken as it is.
inline const QuantizedRows& kernel_operand(const QuantizedRows& operand) noexcept { return operand; }

}  // namespace detail
}  // namespace attn
