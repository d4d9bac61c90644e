#pragma once
/// @file
/// Step 5 of self-attention: a numerically stable softmax over each row of a score matrix
/// (Vaswani et al. 2017, "Attention Is All You Need", eq. 1).
///
/// Each row is shifted by its maximum before exponentiating, so the largest term is exp(0)
/// = 1 and nothing overflows: logits of ±1e4 in float are exact. A row whose entries are
/// all −∞ (every key masked) becomes a row of zeros, not 0/0 = NaN; a row with a NaN or +∞
/// entry becomes all NaN.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "detail/operands.hpp"

namespace attn {

namespace detail {

/// Row chunk for column-major storage: the per-row max and sum vectors live on the stack
/// (no allocation), and each column segment of the chunk is contiguous, so Eigen
/// vectorises the max, exp and sum passes across rows.
inline constexpr Eigen::Index softmax_row_chunk = 32;

/// exp(x), flushed to exactly 0 where it would be below the smallest normal number.
/// Eigen's vectorised exp clamps its argument instead of underflowing, so exp(−∞) and
/// exp(−2e4) come out as ~1e-38 rather than 0: a masked key would keep a sliver of
/// weight, and an all-masked row would turn uniform. A functor rather than
/// `(x < t).select(0, x.exp())` because Eigen 3.4 does not vectorise `select`, and a
/// scalar exp per score costs the tiled kernel a quarter of its time. NaN stays NaN.
template <typename Scalar>
struct flushed_exp_op {
  Scalar underflow = std::log(std::numeric_limits<Scalar>::min());

  Scalar operator()(Scalar x) const { return x < underflow ? Scalar(0) : std::exp(x); }

  template <typename Packet>
  Packet packetOp(const Packet& x) const {
    namespace internal = Eigen::internal;
    // pandnot(a, b) = a & ~b: zero the lanes where x < underflow, keep the rest.
    return internal::pandnot(internal::pexp(x), internal::pcmp_lt(x, internal::pset1<Packet>(underflow)));
  }
};

}  // namespace detail
}  // namespace attn

namespace Eigen::internal {
template <typename Scalar>
struct functor_traits<attn::detail::flushed_exp_op<Scalar>> {
  enum { Cost = functor_traits<scalar_exp_op<Scalar>>::Cost + 2, PacketAccess = packet_traits<Scalar>::HasExp };
};
}  // namespace Eigen::internal

namespace attn {
namespace detail {

/// exp of scores already shifted by their row maximum (so ≤ 0), flushed to 0 on underflow.
template <typename Derived>
auto exp_of_shifted(const Eigen::ArrayBase<Derived>& shifted) {
  return shifted.unaryExpr(flushed_exp_op<typename Derived::Scalar>{});
}

template <typename Rows>
void softmax_rows_chunk(Rows&& rows) {
  using Scalar = typename std::decay_t<Rows>::Scalar;
  using ChunkVector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1, Eigen::ColMajor, softmax_row_chunk, 1>;
  // NaN-propagating, so that a row with a NaN score comes out all NaN.
  ChunkVector row_max = rows.rowwise().redux(Eigen::internal::scalar_max_op<Scalar, Scalar, Eigen::PropagateNaN>());
  // A row of −∞ has no finite maximum to subtract; 0 keeps exp(−∞ − 0) = 0 instead of NaN.
  row_max = (row_max.array() == -std::numeric_limits<Scalar>::infinity()).select(Scalar(0), row_max);
  rows.array().colwise() -= row_max.array();
  rows.array() = exp_of_shifted(rows.array());
  ChunkVector row_sum = rows.rowwise().sum();
  // Every row with a finite entry sums to at least exp(0) = 1; an all-masked row sums to 0
  // and stays 0 when divided by 1; a row with a NaN or +∞ score sums to NaN and becomes NaN.
  row_sum = (row_sum.array() == Scalar(0)).select(Scalar(1), row_sum);
  rows.array().colwise() /= row_sum.array();
}

template <typename Row>
void softmax_row(Row&& row) {
  using Scalar = typename std::decay_t<Row>::Scalar;
  Scalar row_max = row.template maxCoeff<Eigen::PropagateNaN>();
  if (row_max == -std::numeric_limits<Scalar>::infinity()) row_max = Scalar(0);
  row.array() -= row_max;
  row.array() = exp_of_shifted(row.array());
  const Scalar row_sum = row.sum();
  if (row_sum != Scalar(0)) row.array() /= row_sum;
}

}  // namespace detail

/// Replaces each row of `scores` by its softmax, in place and without allocating. Entries
/// of −∞ (masked keys) get weight 0; an all −∞ row becomes all zeros. Accepts any
/// writable matrix, Map or block, in either storage order, a temporary view such as
/// `scores.topRows(2)` included.
template <typename Scores>
void softmax_rows_inplace(Scores&& scores) {
  detail::require_writable<Scores>();
  // Only the static_assert above speaks for a const or expression argument.
  if constexpr (detail::is_writable_matrix_v<Scores>) {
    using Derived = std::decay_t<Scores>;
    detail::require_floating_point<typename Derived::Scalar>();
    const Eigen::Index n_rows = scores.rows();
    if (scores.cols() == 0) return;
    if constexpr (Derived::IsRowMajor) {
      for (Eigen::Index row = 0; row < n_rows; ++row) detail::softmax_row(scores.row(row));
    } else {
      for (Eigen::Index first = 0; first < n_rows; first += detail::softmax_row_chunk) {
        const Eigen::Index count = std::min(detail::softmax_row_chunk, n_rows - first);
        detail::softmax_rows_chunk(scores.middleRows(first, count));
      }
    }
  }
}

/// The row-wise softmax of `scores` as a new matrix of the same shape.
template <typename Derived>
auto softmax_rows(const Eigen::MatrixBase<Derived>& scores) {
  detail::require_floating_point<typename Derived::Scalar>();
  detail::plain_matrix<typename Derived::Scalar, Derived::RowsAtCompileTime, Derived::ColsAtCompileTime> weights =
      scores;
  softmax_rows_inplace(weights);
  return weights;
}

}  // namespace attn
