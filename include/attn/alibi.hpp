#pragma once
/// @file
/// ALiBi, attention with linear biases (Press, Smith & Lewis 2022, "Train Short, Test Long:
/// Attention with Linear Biases Enables Input Length Extrapolation"): no position embedding;
/// instead each head h subtracts m_h · distance from the score of a query and a key, with a
/// fixed, head-specific slope m_h. Given here as the per-head slopes and as a score modifier
/// for the tiled kernel (`Mods` in flash.hpp), so the n_q×n_k bias never exists.

#include <cmath>
#include <string>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

/// The paper's head slopes, one per head, as its reference code (`get_slopes` in
/// ofirpress/attention_with_linear_biases), BLOOM and Hugging Face's `build_alibi_tensor`
/// compute them:
/// - H a power of two: the geometric sequence m_h = 2^(−8(h+1)/H), h = 0 … H−1, e.g. 1/2,
///   1/4, …, 1/256 for H = 8;
/// - otherwise, with P the largest power of two below H: the P slopes of P heads, then the
///   first H−P of every other slope of 2P heads, 2^(−4(2j+1)/P), j = 0 … H−P−1 (the paper
///   trains powers of two only; this keeps their spacing for other head counts). For H = 6:
///   1/4, 1/16, 1/64, 1/256, then 1/2, 1/8.
/// Computed in double with exact powers of two and rounded once to Scalar. Throws
/// `std::invalid_argument` unless num_heads ≥ 1.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, 1> alibi_slopes(Eigen::Index num_heads) {
  detail::require_floating_point<Scalar>();
  if (num_heads < 1) {
    detail::raise<std::invalid_argument>("attn::alibi_slopes: num_heads must be at least 1, got ", num_heads);
  }
  Eigen::Index power = 1;  // P: the largest power of two ≤ num_heads
  while (power * 2 <= num_heads) power *= 2;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> slopes(num_heads);
  for (Eigen::Index h = 0; h < power; ++h) {
    slopes(h) = static_cast<Scalar>(std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(power)));
  }
  for (Eigen::Index j = 0; j < num_heads - power; ++j) {
    slopes(power + j) =
        static_cast<Scalar>(std::exp2(-4.0 * static_cast<double>(2 * j + 1) / static_cast<double>(power)));
  }
  return slopes;
}

/// ALiBi as a score modifier for `flash_attention_into`'s `Mods`:
/// score − slopes[head] · |query + query_offset − key|.
///
/// `query_offset` places query i at key position i + query_offset: n_k − n_q (what
/// `alibi_score_mod` sets) matches attn's bottom-right alignment of `causal`, so that the
/// last query sits at the last key, as when new tokens attend a KV cache.
///
/// Under a causal mask only keys at or before the query are seen, and |i − j| = i − j: this
/// is the paper's −m·(i − j). Without a mask (an encoder) it is the symmetric variant,
/// penalising distance both ways. BLOOM and Hugging Face add +m·j instead of −m·(i − j); the
/// two differ by m·i, a constant per row, which the softmax cancels, so under a causal mask
/// they give the same attention (but not the same log-sum-exp).
///
/// Holds a non-owning pointer to the slopes, which must outlive every call that uses the
/// modifier and hold one slope per query head (Heads::num_heads; with grouped-query
/// attention each query head still has its own slope). Nothing checks that count: a modifier
/// with fewer slopes than heads reads past their end. Copying it is copying three words.
template <typename Scalar>
struct AlibiScoreMod {
  /// Head h's slope is slopes[h · slope_stride].
  const Scalar* slopes = nullptr;
  Eigen::Index slope_stride = 1;
  Eigen::Index query_offset = 0;

  Scalar operator()(Scalar score, Eigen::Index query, Eigen::Index key, Eigen::Index head) const noexcept {
    const Eigen::Index distance = query + query_offset - key;
    return score - slopes[head * slope_stride] * static_cast<Scalar>(distance < 0 ? -distance : distance);
  }

  /// d score_mod / d score, for the backward pass: an added bias passes the gradient as is.
  Scalar derivative(Scalar /*score*/, Eigen::Index /*query*/, Eigen::Index /*key*/,
                    Eigen::Index /*head*/) const noexcept {
    return Scalar(1);
  }
};

/// The ALiBi modifier for n_q queries over n_k keys, aligned bottom-right (query_offset =
/// n_k − n_q). `slopes` (one per query head, e.g. from `alibi_slopes`) must be a vector
/// stored in memory, a VectorX, a Map or a block of one, and must outlive the modifier; it is
/// referred to, not copied, so this allocates nothing. Throws `attn::dimension_error` when
/// slopes is not a vector.
template <typename Derived>
AlibiScoreMod<typename Derived::Scalar> alibi_score_mod(const Eigen::MatrixBase<Derived>& slopes, Eigen::Index n_q,
                                                        Eigen::Index n_k) {
  detail::require_floating_point<typename Derived::Scalar>();
  static_assert(Derived::IsVectorAtCompileTime || Derived::RowsAtCompileTime == Eigen::Dynamic ||
                    Derived::ColsAtCompileTime == Eigen::Dynamic,
                "attn::alibi_score_mod: slopes must be a vector, one slope per head");
  static_assert((Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit) != 0,
                "attn::alibi_score_mod: slopes must be stored in memory (a vector, a Map or a block of "
                "one); evaluate an expression into a vector first");
  const Derived& stored = slopes.derived();
  if (stored.rows() != 1 && stored.cols() != 1) {
    detail::raise_shape("attn::alibi_score_mod", detail::operand("slopes", stored), "a vector, one slope per head");
  }
  // The step between consecutive slopes, whichever way the vector lies in its storage.
  const Eigen::Index row_step = Derived::IsRowMajor ? stored.outerStride() : stored.innerStride();
  const Eigen::Index col_step = Derived::IsRowMajor ? stored.innerStride() : stored.outerStride();
  return {stored.data(), stored.cols() == 1 ? row_step : col_step, n_k - n_q};
}

/// A temporary vector would be destroyed at the end of the statement, leaving the modifier
/// dangling: keep the slopes in a variable.
template <typename Derived>
AlibiScoreMod<typename Derived::Scalar> alibi_score_mod(Eigen::PlainObjectBase<Derived>&& slopes, Eigen::Index n_q,
                                                        Eigen::Index n_k) = delete;

}  // namespace attn
