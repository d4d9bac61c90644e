#pragma once
/// @file
/// Step 4 of self-attention: scaled dot-product scores S = scale·Q·Kᵀ (Vaswani et al. 2017,
/// "Attention Is All You Need", eq. 1), one row per query and one column per key.

#include <cmath>
#include <sstream>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

/// 1/√d_k, the scale of Vaswani et al.: it keeps the variance of q·k near 1 whatever d_k,
/// so the softmax does not saturate. Computed in double and rounded once to `Scalar`.
template <typename Scalar>
Scalar default_scale(Eigen::Index d_k) {
  detail::require_floating_point<Scalar>();
  if (d_k <= 0) {
    detail::raise<std::invalid_argument>("attn::default_scale: d_k must be positive, got ", d_k);
  }
  return static_cast<Scalar>(1.0 / std::sqrt(static_cast<double>(d_k)));
}

namespace detail {

template <typename DerivedQ, typename DerivedK>
void check_scores(const char* operation, const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                  typename DerivedQ::Scalar scale) {
  require_floating_point<typename DerivedQ::Scalar>();
  require_same_scalar<DerivedQ, DerivedK>();
  static_assert(extents_compatible(DerivedQ::ColsAtCompileTime, DerivedK::ColsAtCompileTime),
                "attn::scaled_scores: q and k must have the same number of columns (d_k)");
  require_extents_match(operation, operand("q", q), Extent::columns, operand("k", k), Extent::columns);
  require_valid_scale(operation, scale);
}

/// Where a score scale·Σ_d q_d·k_d takes its scale: on the query before the product when
/// the scale shrinks (≤ 1), on the product after it when it grows. Either way no term or
/// partial sum is larger than the scaled score's own, so a score overflows only when its
/// true value (or a partial sum of it) is out of range, and both paths overflow alike.
template <typename Scalar>
constexpr bool scale_queries_first(Scalar scale) noexcept {
  return scale <= Scalar(1);
}

/// out = scale·q·kᵀ with the scale placed as `scale_queries_first` says. The product runs
/// with the scale as its alpha (no extra pass), which Eigen applies after the sums for a
/// blocked product and before them for a small one; the scores that overflowed where the
/// other order would not (rare: non-finite, found in one pass) are recomputed in the
/// right order.
template <typename DerivedQ, typename DerivedK, typename Out>
void scaled_scores_unchecked(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                             typename DerivedQ::Scalar scale, Out& out) {
  // scores: (n_q × n_k)
  out.noalias() = scale * (q * k.transpose());
  if (out.allFinite()) return;
  const bool queries_first = scale_queries_first(scale);
  for (Eigen::Index query = 0; query < out.rows(); ++query) {
    for (Eigen::Index key = 0; key < out.cols(); ++key) {
      if (std::isfinite(out(query, key))) continue;
      out(query, key) = queries_first ? (scale * q.row(query)).dot(k.row(key)) : scale * q.row(query).dot(k.row(key));
    }
  }
}

}  // namespace detail

/// out = scale·q·kᵀ, written into caller storage: (n_q×d_k), (n_k×d_k) → n_q×n_k.
/// `scale` must be finite and positive; `out` must not alias `q` or `k`. A score overflows
/// only when its true value does (see `detail::scale_queries_first`).
template <typename DerivedQ, typename DerivedK, typename Out>
void scaled_scores_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                        typename DerivedQ::Scalar scale, Out&& out) {
  detail::require_writable<Out>();
  detail::check_scores("attn::scaled_scores_into", q, k, scale);
  detail::fit_output("attn::scaled_scores_into", "out", out, q.rows(), k.rows());
  detail::scaled_scores_unchecked(q, k, scale, out);
}

/// scale·q·kᵀ as a new n_q×n_k matrix, fixed-size when q and k are.
template <typename DerivedQ, typename DerivedK>
auto scaled_scores(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                   typename DerivedQ::Scalar scale) {
  detail::check_scores("attn::scaled_scores", q, k, scale);
  detail::plain_matrix<typename DerivedQ::Scalar, DerivedQ::RowsAtCompileTime, DerivedK::RowsAtCompileTime> out(
      q.rows(), k.rows());
  detail::scaled_scores_unchecked(q, k, scale, out);
  return out;
}

}  // namespace attn
