#pragma once
/// @file
/// Steps 6–7 of self-attention: each output row is the attention-weighted sum of the value
/// rows, O = P·V (Vaswani et al. 2017, "Attention Is All You Need", eq. 1).

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

namespace detail {

template <typename DerivedP, typename DerivedV>
void check_weighted_sum(const char* operation, const Eigen::MatrixBase<DerivedP>& p,
                        const Eigen::MatrixBase<DerivedV>& v) {
  require_floating_point<typename DerivedP::Scalar>();
  require_same_scalar<DerivedP, DerivedV>();
  static_assert(extents_compatible(DerivedP::ColsAtCompileTime, DerivedV::RowsAtCompileTime),
                "attn::weighted_sum: p must have one column per row of v (n_k)");
  require_extents_match(operation, operand("p", p), Extent::columns, operand("v", v), Extent::rows);
}

/// out = p·v. With no keys (n_k = 0) every output row is an empty sum, i.e. zero; say so
/// explicitly rather than rely on how a product with an empty inner dimension behaves.
template <typename DerivedP, typename DerivedV, typename Out>
void weighted_sum_unchecked(const Eigen::MatrixBase<DerivedP>& p, const Eigen::MatrixBase<DerivedV>& v, Out& out) {
  if (p.cols() == 0) {
    out.setZero();
  } else {
    // output: (n_q × d_v)
    out.noalias() = p * v;
  }
}

}  // namespace detail

/// out = p·v, written into caller storage: (n_q×n_k), (n_k×d_v) → n_q×d_v.
/// `out` must not alias `p` or `v`.
template <typename DerivedP, typename DerivedV, typename Out>
void weighted_sum_into(const Eigen::MatrixBase<DerivedP>& p, const Eigen::MatrixBase<DerivedV>& v, Out&& out) {
  detail::require_writable<Out>();
  detail::check_weighted_sum("attn::weighted_sum_into", p, v);
  detail::fit_output("attn::weighted_sum_into", "out", out, p.rows(), v.cols());
  detail::weighted_sum_unchecked(p, v, out);
}

/// p·v as a new n_q×d_v matrix, fixed-size when p and v are.
template <typename DerivedP, typename DerivedV>
auto weighted_sum(const Eigen::MatrixBase<DerivedP>& p, const Eigen::MatrixBase<DerivedV>& v) {
  detail::check_weighted_sum("attn::weighted_sum", p, v);
  detail::plain_matrix<typename DerivedP::Scalar, DerivedP::RowsAtCompileTime, DerivedV::ColsAtCompileTime> out(
      p.rows(), v.cols());
  detail::weighted_sum_unchecked(p, v, out);
  return out;
}

}  // namespace attn
