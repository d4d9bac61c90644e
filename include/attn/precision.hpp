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

#if defined(__F16C__)
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

}  // namespace detail
}  // namespace attn
