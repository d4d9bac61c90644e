#pragma once
/// @file
/// Combining two attention results computed over disjoint sets of keys, through their
/// log-sum-exp (the "online softmax" identity of Milakov & Gimelshein 2018, used by
/// FlashAttention to split keys across tiles and threads).

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

/// Merges the attention of the same queries over a second, disjoint set of keys into the
/// first: with O_a, lse_a over keys A and O_b, lse_b over keys B, afterwards `out` and `lse`
/// hold the attention over A ∪ B, exactly as if computed at once (up to rounding):
///
///     lse = log(exp(lse_a) + exp(lse_b)),  O = exp(lse_a − lse)·O_a + exp(lse_b − lse)·O_b.
///
/// `out` is n_q×(H·d_v) with heads as column blocks, `lse` is n_q×H (natural log; −∞ for a
/// query that attends no key, whose output row is zero). A side with lse = −∞ contributes
/// nothing, whatever its output row holds; both −∞ give zeros and −∞. A side with lse = NaN
/// (a NaN or +∞ score) makes the row NaN and its lse NaN.
template <typename OutA, typename LseA, typename DerivedOutB, typename DerivedLseB>
void merge_into(OutA&& out, LseA&& lse, const Eigen::MatrixBase<DerivedOutB>& other_out,
                const Eigen::MatrixBase<DerivedLseB>& other_lse) {
  detail::require_writable<OutA>();
  detail::require_writable<LseA>();
  using Scalar = typename std::decay_t<OutA>::Scalar;
  detail::require_same_scalar<std::decay_t<OutA>, std::decay_t<LseA>, DerivedOutB, DerivedLseB>();
  constexpr const char* operation = "attn::merge_into";
  using detail::Extent;
  using detail::operand;
  detail::require_shape(operation, operand("other_out", other_out), out.rows(), out.cols(), "out's shape");
  detail::require_shape(operation, operand("other_lse", other_lse), lse.rows(), lse.cols(), "lse's shape");
  detail::require_extents_match(operation, operand("out", out), Extent::rows, operand("lse", lse), Extent::rows);
  const Eigen::Index num_heads = lse.cols();
  if (num_heads == 0 ? out.cols() != 0 : out.cols() % num_heads != 0) {
    detail::raise<dimension_error>(operation, ": out has ", out.cols(), " columns, not a multiple of lse's ", num_heads,
                                   " heads");
  }
  if (num_heads == 0) return;
  const Eigen::Index d_v = out.cols() / num_heads;
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Eigen::Index head = 0; head < num_heads; ++head) {
    for (Eigen::Index row = 0; row < out.rows(); ++row) {
      const Scalar lse_a = lse(row, head);
      const Scalar lse_b = other_lse(row, head);
      auto out_row = out.row(row).segment(head * d_v, d_v);
      const auto other_row = other_out.row(row).segment(head * d_v, d_v);
      if (std::isnan(lse_a) || std::isnan(lse_b)) {
        out_row.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
        lse(row, head) = std::numeric_limits<Scalar>::quiet_NaN();
        continue;
      }
      // An empty side's row is not read: 0·(its contents) would be NaN where they are not finite.
      if (lse_b == minus_infinity) {
        if (lse_a == minus_infinity) out_row.setZero();
        continue;
      }
      if (lse_a == minus_infinity) {
        out_row = other_row;
        lse(row, head) = lse_b;
        continue;
      }
      const Scalar lse_max = std::max(lse_a, lse_b);
      // Shifting by the larger lse keeps both weights in (0, 1]: nothing overflows.
      const Scalar weight_a = std::exp(lse_a - lse_max);
      const Scalar weight_b = std::exp(lse_b - lse_max);
      const Scalar total = weight_a + weight_b;
      out_row = (weight_a / total) * out_row + (weight_b / total) * other_row;
      lse(row, head) = lse_max + std::log(total);
    }
  }
}

}  // namespace attn
