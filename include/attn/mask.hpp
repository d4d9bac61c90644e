#pragma once
/// @file
/// Masks: which keys each query may attend, as explicit bool matrices (`true` = may
/// attend) and applied to a score matrix. The rules are documented on
/// `attn::AttentionOptions`.

#include <algorithm>
#include <limits>

#include <Eigen/Core>

#include "detail/eigen_types.hpp"
#include "error.hpp"
#include "options.hpp"

namespace attn {

/// A bool matrix of n_q×n_k, `true` = may attend.
using MaskMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

/// The causal rule, aligned bottom-right: query i of n_q may attend key j of n_k iff
/// j ≤ i + (n_k − n_q).
constexpr bool causal_allows(Eigen::Index query, Eigen::Index key, Eigen::Index n_q, Eigen::Index n_k) noexcept {
  return key <= query + (n_k - n_q);
}

/// How many leading keys query i may attend under the causal rule (0 … n_k).
constexpr Eigen::Index causal_key_count(Eigen::Index query, Eigen::Index n_q, Eigen::Index n_k) noexcept {
  return std::clamp<Eigen::Index>(query + (n_k - n_q) + 1, 0, n_k);
}

/// The causal rule as an explicit n_q×n_k matrix.
inline MaskMatrix causal_mask(Eigen::Index n_q, Eigen::Index n_k) {
  MaskMatrix mask(n_q, n_k);
  for (Eigen::Index key = 0; key < n_k; ++key) {
    for (Eigen::Index query = 0; query < n_q; ++query) mask(query, key) = causal_allows(query, key, n_q, n_k);
  }
  return mask;
}

/// Key padding as an explicit n_q×n_k matrix: the first `valid_keys` keys may be attended.
inline MaskMatrix key_padding_mask(Eigen::Index n_q, Eigen::Index n_k, Eigen::Index valid_keys) {
  MaskMatrix mask(n_q, n_k);
  for (Eigen::Index key = 0; key < n_k; ++key) mask.col(key).setConstant(key < valid_keys);
  return mask;
}

namespace detail {

/// Adds the bias and sets every masked score to −∞, without checking the options.
template <typename Derived, typename Scalar>
void mask_scores_unchecked(Eigen::MatrixBase<Derived>& scores, const AttentionOptions<Scalar>& options) {
  constexpr Scalar masked = -std::numeric_limits<Scalar>::infinity();
  const Eigen::Index n_q = scores.rows();
  const Eigen::Index n_k = scores.cols();
  // An empty matrix may have a null data pointer that not even a zero-length row may offset.
  if (n_q == 0 || n_k == 0) return;
  if (!options.bias.empty()) scores += options.bias.map();
  if (!options.mask.empty()) {
    for (Eigen::Index key = 0; key < n_k; ++key) {
      for (Eigen::Index query = 0; query < n_q; ++query) {
        if (!options.mask(query, key)) scores(query, key) = masked;
      }
    }
  }
  if (options.valid_keys) scores.rightCols(n_k - *options.valid_keys).setConstant(masked);
  if (options.causal) {
    // Walk the storage order: row tails for row-major, column heads for column-major
    // (strided writes across a column-major matrix cost ~100× more at n = 1024).
    if constexpr (Derived::IsRowMajor) {
      for (Eigen::Index query = 0; query < n_q; ++query) {
        scores.row(query).tail(n_k - causal_key_count(query, n_q, n_k)).setConstant(masked);
      }
    } else {
      for (Eigen::Index key = 0; key < n_k; ++key) {
        // Queries i < key − (n_k − n_q) come before this key.
        const Eigen::Index blind_queries = std::clamp<Eigen::Index>(key - (n_k - n_q), 0, n_q);
        scores.col(key).head(blind_queries).setConstant(masked);
      }
    }
  }
}

}  // namespace detail

/// Applies `options`' bias and masks to an n_q×n_k score matrix in place: the bias is added
/// and every masked score becomes −∞, ready for `softmax_rows_inplace`. The scale is not
/// applied here (`scaled_scores` does that).
template <typename Derived, typename Scalar>
void mask_scores_inplace(Eigen::MatrixBase<Derived>& scores, const AttentionOptions<Scalar>& options) {
  static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                "attn::mask_scores_inplace: the options must have the scores' scalar type");
  detail::validate_options("attn::mask_scores_inplace", options, scores.rows(), scores.cols());
  detail::mask_scores_unchecked(scores, options);
}

template <typename Derived, typename Scalar>
void mask_scores_inplace(Eigen::MatrixBase<Derived>&& scores, const AttentionOptions<Scalar>& options) {
  mask_scores_inplace(scores, options);
}

}  // namespace attn
