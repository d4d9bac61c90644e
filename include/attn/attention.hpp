#pragma once
/// @file
/// Scaled dot-product attention composed from the kernels (Vaswani et al. 2017, "Attention
/// Is All You Need", eq. 1): O = softmax(scale·Q·Kᵀ + bias, masked)·V, and self-attention
/// from a token matrix X through a `QKVProjection`.
///
/// Which path runs when:
/// - asking for the weights (`attention(q, k, v, options, weights)`, `attention_into`,
///   `self_attention(…, weights)`) runs the reference path here: it materialises the
///   n_q×n_k weight matrix P, which is what such a caller wants, at n_q·n_k scalars of
///   memory;
/// - `attention(q, k, v[, options])` and `self_attention(x, projection[, options])` without
///   weights run the tiled kernel of flash.hpp on dynamic-size inputs (O(n·d) memory, threads
///   per `options.num_threads`), and the reference path on fully fixed-size inputs, where it
///   stays on the stack with no allocation at all.
/// Both give the same results to rounding (tests/test_flash.cpp).

#include <limits>
#include <string>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"
#include "flash.hpp"
#include "mask.hpp"
#include "mods.hpp"
#include "options.hpp"
#include "projection.hpp"
#include "scores.hpp"
#include "softmax.hpp"
#include "weighted_sum.hpp"

namespace attn {

namespace detail {

template <typename DerivedQ, typename DerivedK, typename DerivedV>
void check_attention(const char* operation, const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                     const Eigen::MatrixBase<DerivedV>& v,
                     const AttentionOptions<typename DerivedQ::Scalar>& options) {
  require_floating_point<typename DerivedQ::Scalar>();
  require_same_scalar<DerivedQ, DerivedK, DerivedV>();
  static_assert(extents_compatible(DerivedQ::ColsAtCompileTime, DerivedK::ColsAtCompileTime),
                "attn::attention: q and k must have the same number of columns (d_k)");
  static_assert(extents_compatible(DerivedK::RowsAtCompileTime, DerivedV::RowsAtCompileTime),
                "attn::attention: k and v must have the same number of rows (one per key)");
  require_extents_match(operation, operand("q", q), Extent::columns, operand("k", k), Extent::columns);
  require_extents_match(operation, operand("k", k), Extent::rows, operand("v", v), Extent::rows);
  validate_options(operation, options, q.rows(), k.rows());
  require_defined_scale(operation, options, q.cols());
}

/// The softmax of each row of `scores` in place and out = P·v, key by key, never reading
/// the value of a key whose score is −∞: P·v as a product would multiply a masked key's
/// garbage (NaN or ∞ in padding) by its weight 0 and get NaN. The reference path's way
/// when v is not all finite; the same weights as `softmax_rows_inplace` to rounding.
template <typename Scores, typename DerivedV, typename Out>
void softmax_and_sum_skipping_masked(Scores& scores, const Eigen::MatrixBase<DerivedV>& v, Out& out) {
  using Scalar = typename DerivedV::Scalar;
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const flushed_exp_op<Scalar> exp_op;
  for (Eigen::Index query = 0; query < scores.rows(); ++query) {
    auto row = scores.row(query);
    auto out_row = out.row(query);
    out_row.setZero();
    const Scalar row_max = row.size() == 0 ? minus_infinity : row.template maxCoeff<Eigen::PropagateNaN>();
    if (row_max == minus_infinity) {
      row.setZero();
      continue;
    }
    Scalar row_sum = 0;
    for (Eigen::Index key = 0; key < row.size(); ++key) {
      if (row(key) == minus_infinity) {
        row(key) = 0;
        continue;
      }
      row(key) = exp_op(row(key) - row_max);
      row_sum += row(key);
      out_row += row(key) * v.row(key);
    }
    row /= row_sum;
    out_row /= row_sum;
  }
}

/// The reference path after its checks, the one every caller of the materialised weights
/// uses: the scores scale·q·kᵀ (n_q × n_k) into `weights`, the bias, the score modifier,
/// the masks and the mask modifier, in the tiled kernel's order, then the softmax and P·V
/// into `out`. For one head of a multi-head problem, `head` is the index the modifiers see.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename ScoreMod, typename MaskMod, typename Out,
          typename Weights>
void attention_unchecked(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                         const Eigen::MatrixBase<DerivedV>& v,
                         const AttentionOptions<typename DerivedQ::Scalar>& options,
                         const Mods<ScoreMod, MaskMod>& mods, Eigen::Index head, Out&& out, Weights&& weights) {
  using Scalar = typename DerivedQ::Scalar;
  const Scalar scale = options.scale ? *options.scale : default_scale<Scalar>(q.cols());
  // weights: (n_q × n_k), first holding the scores, then overwritten by their softmax
  scaled_scores_unchecked(q, k, scale, weights);
  add_bias_unchecked(weights, options);
  if constexpr (!is_identity_mod<ScoreMod>::value) {
    for (Eigen::Index query = 0; query < weights.rows(); ++query) {
      for (Eigen::Index key = 0; key < weights.cols(); ++key) {
        weights(query, key) = mods.score_mod(weights(query, key), query, key, head);
      }
    }
  }
  apply_masks_unchecked(weights, options);
  if constexpr (!is_identity_mod<MaskMod>::value) {
    for (Eigen::Index query = 0; query < weights.rows(); ++query) {
      for (Eigen::Index key = 0; key < weights.cols(); ++key) {
        if (!mods.mask_mod(query, key, head)) weights(query, key) = -std::numeric_limits<Scalar>::infinity();
      }
    }
  }
  if (v.allFinite()) {
    softmax_rows_inplace(weights);
    // output: (n_q × d_v)
    weighted_sum_unchecked(weights, v, out);
  } else {
    softmax_and_sum_skipping_masked(weights, v, out);
  }
}

}  // namespace detail

/// Attention written into caller storage: `out` (n_q×d_v) and the weights P (n_q×n_k),
/// which double as the scratch for the scores. With both buffers already the right size,
/// as in a loop that reuses them, nothing is allocated. Neither may alias an input.
///
/// q: n_q×d_k, k: n_k×d_k, v: n_k×d_v. Cross-attention (n_q ≠ n_k, d_v ≠ d_k) is fine;
/// n_q = 0 gives an empty result and n_k = 0 an output of zeros.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Out, typename Weights>
void attention_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                    const Eigen::MatrixBase<DerivedV>& v, const AttentionOptions<typename DerivedQ::Scalar>& options,
                    Out&& out, Weights&& weights) {
  constexpr const char* operation = "attn::attention_into";
  detail::require_writable<Out>();
  detail::require_writable<Weights>();
  detail::check_attention(operation, q, k, v, options);
  detail::fit_output(operation, "out", out, q.rows(), v.cols());
  detail::fit_output(operation, "weights", weights, q.rows(), k.rows());
  detail::attention_unchecked(q, k, v, options, Mods<>{}, 0, out, weights);
}

/// Attention as a new n_q×d_v matrix: the tiled kernel for dynamic sizes, the reference
/// path (fixed-size, heap-free) when every size is fixed.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
auto attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
               const Eigen::MatrixBase<DerivedV>& v, const AttentionOptions<typename DerivedQ::Scalar>& options = {}) {
  using Scalar = typename DerivedQ::Scalar;
  detail::check_attention("attn::attention", q, k, v, options);
  detail::plain_matrix<Scalar, DerivedQ::RowsAtCompileTime, DerivedV::ColsAtCompileTime> out(q.rows(), v.cols());
  constexpr bool fixed_size = DerivedQ::SizeAtCompileTime != Eigen::Dynamic &&
                              DerivedK::SizeAtCompileTime != Eigen::Dynamic &&
                              DerivedV::SizeAtCompileTime != Eigen::Dynamic;
  if constexpr (!fixed_size) {
    Workspace<Scalar> workspace;
    flash_attention_into(q, k, v, Heads{}, options, out, workspace);
  } else {
    detail::row_major_matrix<Scalar, DerivedQ::RowsAtCompileTime, DerivedK::RowsAtCompileTime> weights(q.rows(),
                                                                                                       k.rows());
    detail::attention_unchecked(q, k, v, options, Mods<>{}, 0, out, weights);
  }
  return out;
}

/// Attention as a new n_q×d_v matrix, also handing back the attention weights P (n_q×n_k)
/// in `weights` (resized if it is a plain matrix), for inspection and visualisation.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Weights>
auto attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
               const Eigen::MatrixBase<DerivedV>& v, const AttentionOptions<typename DerivedQ::Scalar>& options,
               Weights&& weights) {
  constexpr const char* operation = "attn::attention";
  detail::require_writable<Weights>();
  detail::check_attention(operation, q, k, v, options);
  detail::fit_output(operation, "weights", weights, q.rows(), k.rows());
  detail::plain_matrix<typename DerivedQ::Scalar, DerivedQ::RowsAtCompileTime, DerivedV::ColsAtCompileTime> out(
      q.rows(), v.cols());
  detail::attention_unchecked(q, k, v, options, Mods<>{}, 0, out, weights);
  return out;
}

/// Self-attention of a token matrix x (n×d_model, one token per row): Q, K and V from
/// `projection`, then `attention`. Fixed-size and heap-free when x and the projection are.
template <typename DerivedX, typename Scalar, int DModel, int DK, int DV>
auto self_attention(const Eigen::MatrixBase<DerivedX>& x, const QKVProjection<Scalar, DModel, DK, DV>& projection,
                    const AttentionOptions<Scalar>& options = {}) {
  const auto qkv = projection.project(x);
  return attention(qkv.q, qkv.k, qkv.v, options);
}

/// Self-attention that also hands back the attention weights (n×n) in `weights`.
template <typename DerivedX, typename Scalar, int DModel, int DK, int DV, typename Weights>
auto self_attention(const Eigen::MatrixBase<DerivedX>& x, const QKVProjection<Scalar, DModel, DK, DV>& projection,
                    const AttentionOptions<Scalar>& options, Weights&& weights) {
  const auto qkv = projection.project(x);
  return attention(qkv.q, qkv.k, qkv.v, options, weights);
}

}  // namespace attn
