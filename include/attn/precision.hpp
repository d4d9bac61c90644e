#pragma once
/// @file
/// Storage precision: the scalars attn stores operands in, and the scalar it computes in.
/// Queries, keys and values (and the KV cache) may be stored in 16 bits, as bfloat16
/// (`attn::bfloat16`, float's exponent with 8 bits of mantissa) or IEEE half
/// (`attn::half`, 11 bits of mantissa and a range of ±65504); the tiled kernel converts
/// each tile to float as it reads it and computes in float, as PyTorch (its "opmath"
/// type), oneDNN and FlashAttention do. Eigen's own products in bfloat16 or half
/// accumulate in 16 bits (a 1×1024 by 1024×1 product of ones in bfloat16 is 512), so attn
/// never lets one reach them.

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#if defined(__F16C__) || defined(EIGEN_VECTORIZE_SSE2)
#include <immintrin.h>
#endif

namespace attn {

using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

namespace detail {

/// The scalar an operand stored as `Storage` is computed in: float for the 16-bit types,
/// the type itself otherwise.
template <typename Storage>
struct compute_scalar {
  using type = Storage;
};
template <>
struct compute_scalar<Eigen::bfloat16> {
  using type = float;
};
template <>
struct compute_scalar<Eigen::half> {
  using type = float;
};
template <typename Storage>
using compute_scalar_t = typename compute_scalar<std::remove_cv_t<Storage>>::type;

/// The scalar an Eigen expression's entries are computed in.
template <typename Derived>
using compute_scalar_of = compute_scalar_t<typename Derived::Scalar>;

/// True for a storage type attn computes in another scalar (bfloat16, half).
template <typename Storage>
inline constexpr bool is_reduced_precision_v = !std::is_same_v<compute_scalar_t<Storage>, std::remove_cv_t<Storage>>;

/// `count` 16-bit values to float, one at a time through the type's own conversion: the
/// reference `widen` is tested against.
template <typename Storage>
void widen_reference(const Storage* from, float* to, Eigen::Index count) noexcept {
  for (Eigen::Index i = 0; i < count; ++i) to[i] = static_cast<float>(from[i]);
}

/// `count` 16-bit values to float, vectorised. Eigen 3.4 converts a matrix one scalar at
/// a time (its cast functor has no packet path), which made a decode step over a 16-bit
/// cache 8× slower than over a float one: there every converted value is used once.
/// bfloat16 is float's upper half, so its conversion is a shift, which compilers
/// vectorise on every instruction set; half takes F16C's conversion (8 or 16 at a time)
/// where the build has it, else the reference.
template <typename Storage>
void widen(const Storage* from, float* to, Eigen::Index count) noexcept {
  static_assert(is_reduced_precision_v<Storage>, "attn: widen converts bfloat16 or half to float");
  Eigen::Index i = 0;
  if constexpr (std::is_same_v<Storage, Eigen::bfloat16>) {
    for (; i < count; ++i) {
      to[i] = Eigen::numext::bit_cast<float>(static_cast<std::uint32_t>(from[i].value) << 16);
    }
  } else {
#if defined(__F16C__) && defined(__AVX512F__)
    for (; i + 16 <= count; i += 16) {
      _mm512_storeu_ps(to + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + i))));
    }
#endif
#if defined(__F16C__)
    for (; i + 8 <= count; i += 8) {
      _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
    }
#endif
    widen_reference(from + i, to + i, count - i);
  }
}

/// One packet of Eigen's float SIMD (`packet_traits<float>::type`: 16 floats on
/// AVX-512, 8 on AVX, 4 on SSE) loaded from `from`, stored as float, bfloat16 or half,
/// so that a kernel reading 16-bit storage converts in registers, with no scratch between
/// the load and the arithmetic. The same conversions as `widen`; where the build has no
/// vector conversion for the type (half without F16C), `widen_reference` through a
/// buffer on the stack.
template <typename Storage>
EIGEN_ALWAYS_INLINE Eigen::internal::packet_traits<float>::type load_float_packet(const Storage* from) noexcept {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int size = Eigen::internal::packet_traits<float>::size;
  if constexpr (std::is_same_v<Storage, float>) {
    return Eigen::internal::ploadu<Packet>(from);
  } else {
    static_assert(is_reduced_precision_v<Storage>, "attn: load_float_packet reads float, bfloat16 or half");
    [[maybe_unused]] const auto* bits = reinterpret_cast<const unsigned char*>(from);
#if defined(EIGEN_VECTORIZE_AVX512)
    const __m256i stored = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits));
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(stored), 16));
    } else {
      return _mm512_cvtph_ps(stored);
    }
#elif defined(EIGEN_VECTORIZE_AVX2)
    const __m128i stored = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits));
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(stored), 16));
    }
#if defined(__F16C__)
    if constexpr (std::is_same_v<Storage, Eigen::half>) return _mm256_cvtph_ps(stored);
#endif
#elif defined(EIGEN_VECTORIZE_SSE2) && !defined(EIGEN_VECTORIZE_AVX)
    const __m128i stored = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bits));
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16>) {
      return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), stored));
    }
#if defined(__F16C__)
    if constexpr (std::is_same_v<Storage, Eigen::half>) return _mm_cvtph_ps(stored);
#endif
#endif
    alignas(64) float converted[size];
    widen_reference(from, converted, size);
    return Eigen::internal::pload<Packet>(converted);
  }
}

}  // namespace detail
}  // namespace attn
