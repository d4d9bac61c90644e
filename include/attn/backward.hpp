#pragma once
/// @file
/// Gradients of attention: dLoss/dq, dk, dv given dLoss/dout, for training.
///
/// - `flash_attention_backward[_into]`: the tiled backward pass (flash/backward.hpp) for
///   heads side by side as the tiled kernel lays them out (grouped-query and multi-query
///   included), every option and modifier, threads: O(n·d) memory, bitwise the same at any
///   thread count, and with a kept `BackwardWorkspace` and gradients already sized, no
///   allocation.
/// - `attention_backward(q, k, v, d_out[, options])`: the same for one head.
/// - `attention_backward(q, k, v, d_out, options, weights)`: the reference backward on the
///   materialised weights P (n_q×n_k), which it hands back, with the gradient of
///   `options.bias` too; plain, for checking and for callers who want P anyway.

#include <type_traits>

#include <Eigen/Core>

#include "attention.hpp"
#include "detail/operands.hpp"
#include "error.hpp"
#include "flash.hpp"
#include "flash/backward.hpp"
#include "mask.hpp"
#include "mods.hpp"
#include "options.hpp"
#include "scores.hpp"
#include "softmax.hpp"

namespace attn {

namespace detail {

template <typename ScoreMod, typename Scalar>
constexpr void require_score_derivative() noexcept {
  static_assert(is_identity_mod<ScoreMod>::value || has_score_derivative<ScoreMod, Scalar>::value,
                "attn::flash_attention_backward: a score_mod used in the backward pass must also define "
                "`Scalar derivative(Scalar score, Eigen::Index query, Eigen::Index key, Eigen::Index head) const`, "
                "d score_mod / d score at the score it was given (1 for an added bias such as ALiBi, "
                "1 - tanh(score/cap)^2 for soft-capping)");
}

/// The backward's checks beyond the forward's: dOut has the output's shape, and the
/// forward's results and dL, when given, theirs.
template <typename DerivedDOut, typename Scalar>
void check_backward_inputs(const char* operation, const Eigen::MatrixBase<DerivedDOut>& d_out, Eigen::Index n_q,
                           Eigen::Index out_cols, Eigen::Index num_heads, const BackwardInputs<Scalar>& inputs) {
  require_same_scalar<DerivedDOut, Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>();
  require_shape(operation, operand("d_out", d_out), n_q, out_cols, "the output's shape");
  if (inputs.out.empty() != inputs.lse.empty()) {
    raise<std::invalid_argument>(operation, ": give the forward's out and lse both, or neither (out is ",
                                 inputs.out.empty() ? "absent" : "present", ", lse is ",
                                 inputs.lse.empty() ? "absent" : "present", ")");
  }
  if (!inputs.out.empty()) {
    require_shape(operation, operand("inputs.out", inputs.out.map()), n_q, out_cols, "the output's shape");
    require_shape(operation, operand("inputs.lse", inputs.lse.map()), n_q, num_heads, "n_q x num_heads");
  }
  if (!inputs.d_lse.empty()) {
    require_shape(operation, operand("inputs.d_lse", inputs.d_lse.map()), n_q, num_heads, "n_q x num_heads");
  }
}

/// The reference backward after its checks: P (n_q×n_k) into `weights` as the reference
/// path computes it, then dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)) (0 where
/// P is 0), dQ = scale·dS·K, dK = scale·dSᵀ·Q, and dBias = dS when there is a bias.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut, typename Weights>
void attention_backward_reference_unchecked(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                                            const Eigen::MatrixBase<DerivedV>& v,
                                            const Eigen::MatrixBase<DerivedDOut>& d_out,
                                            const AttentionOptions<typename DerivedQ::Scalar>& options,
                                            AttentionGradients<typename DerivedQ::Scalar>& gradients,
                                            Weights& weights) {
  using Scalar = typename DerivedQ::Scalar;
  const Scalar scale = options.scale ? *options.scale : default_scale<Scalar>(q.cols());
  scaled_scores_unchecked(q, k, scale, weights);
  add_bias_unchecked(weights, options);
  apply_masks_unchecked(weights, options);
  softmax_rows_inplace(weights);
  gradients.dv.noalias() = weights.transpose() * d_out;
  // d_scores: (n_q × n_k), dP and then dS
  row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_scores = d_out * v.transpose();
  for (Eigen::Index query = 0; query < d_scores.rows(); ++query) {
    const Scalar delta = weights.row(query).dot(d_scores.row(query));
    d_scores.row(query).array() =
        weights.row(query).array().binaryExpr(d_scores.row(query).array() - delta, weighted_difference_op<Scalar>{});
  }
  gradients.dq.noalias() = scale * (d_scores * k);
  gradients.dk.noalias() = scale * (d_scores.transpose() * q);
  if (options.bias.empty()) {
    gradients.d_bias.resize(0, 0);
  } else {
    gradients.d_bias = d_scores;
  }
}

}  // namespace detail

/// The tiled backward pass into caller storage, heads side by side as in
/// `flash_attention_into` (q: n_q×(H·d_k), k: n_k×(H_kv·d_k), v: n_k×(H_kv·d_v), d_out:
/// n_q×(H·d_v)); `gradients.dq`, `dk`, `dv` come out the shapes of q, k, v (resized if
/// needed; `d_bias` is left empty). With grouped-query attention dK and dV sum over the
/// query heads sharing a KV head. `inputs` may carry the forward's out and lse (else they
/// are recomputed) and dLoss/dlse. Masked keys and fully masked rows get zero gradient.
/// Bitwise the same at any `options.num_threads`; with `workspace` and `gradients` kept
/// from the last call, nothing is allocated. A `score_mod` must define `derivative`.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK, typename DerivedV,
          typename DerivedDOut, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
void flash_attention_backward_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                                   const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                                   const AttentionOptions<typename DerivedQ::Scalar>& options,
                                   const Eigen::MatrixBase<DerivedDOut>& d_out,
                                   AttentionGradients<typename DerivedQ::Scalar>& gradients,
                                   BackwardWorkspace<typename DerivedQ::Scalar>& workspace,
                                   const BackwardInputs<typename DerivedQ::Scalar>& inputs = {},
                                   const Mods<ScoreMod, MaskMod>& mods = {}) {
  using Scalar = typename DerivedQ::Scalar;
  constexpr const char* operation = "attn::flash_attention_backward_into";
  static_assert(BlockQ >= 0 && BlockK >= 0,
                "attn::flash_attention_backward: tile sizes must be positive (or 0 for the default)");
  detail::require_score_derivative<ScoreMod, Scalar>();
  detail::check_flash(operation, q, k, v, heads, options);
  const Eigen::Index out_cols = v.cols() / heads.num_kv_heads * heads.num_heads;
  detail::check_backward_inputs(operation, d_out, q.rows(), out_cols, heads.num_heads, inputs);
  detail::fit_output(operation, "gradients.dq", gradients.dq, q.rows(), q.cols());
  detail::fit_output(operation, "gradients.dk", gradients.dk, k.rows(), k.cols());
  detail::fit_output(operation, "gradients.dv", gradients.dv, v.rows(), v.cols());
  if (gradients.d_bias.size() != 0) gradients.d_bias.resize(0, 0);
  detail::flash_attention_backward_unchecked<BlockQ, BlockK>(q, k, v, d_out, heads, options, inputs, mods,
                                                             gradients.dq, gradients.dk, gradients.dv, workspace);
}

/// The tiled backward pass of several heads, as new matrices (allocates them and a
/// workspace; training loops should keep both and call `flash_attention_backward_into`).
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK, typename DerivedV,
          typename DerivedDOut, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
AttentionGradients<typename DerivedQ::Scalar> flash_attention_backward(
    const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
    Heads heads, const Eigen::MatrixBase<DerivedDOut>& d_out,
    const AttentionOptions<typename DerivedQ::Scalar>& options = {},
    const BackwardInputs<typename DerivedQ::Scalar>& inputs = {}, const Mods<ScoreMod, MaskMod>& mods = {}) {
  AttentionGradients<typename DerivedQ::Scalar> gradients;
  BackwardWorkspace<typename DerivedQ::Scalar> workspace;
  flash_attention_backward_into<BlockQ, BlockK>(q, k, v, heads, options, d_out, gradients, workspace, inputs, mods);
  return gradients;
}

/// The gradients of one head's attention(q, k, v, options) given dLoss/dout (n_q×d_v),
/// through the tiled backward pass.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut>
AttentionGradients<typename DerivedQ::Scalar> attention_backward(
    const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
    const Eigen::MatrixBase<DerivedDOut>& d_out, const AttentionOptions<typename DerivedQ::Scalar>& options = {}) {
  return flash_attention_backward(q, k, v, Heads{}, d_out, options);
}

/// The reference backward of one head: the gradients through the materialised weights P
/// (n_q×n_k), handed back in `weights` (resized if it is a plain matrix), and, when the
/// options carry a bias, its gradient in `d_bias` (n_q×n_k). O(n_q·n_k) memory.
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut, typename Weights>
AttentionGradients<typename DerivedQ::Scalar> attention_backward(
    const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
    const Eigen::MatrixBase<DerivedDOut>& d_out, const AttentionOptions<typename DerivedQ::Scalar>& options,
    Weights&& weights) {
  constexpr const char* operation = "attn::attention_backward";
  detail::require_writable<Weights>();
  detail::check_attention(operation, q, k, v, options);
  detail::check_backward_inputs(operation, d_out, q.rows(), v.cols(), 1, BackwardInputs<typename DerivedQ::Scalar>{});
  detail::fit_output(operation, "weights", weights, q.rows(), k.rows());
  AttentionGradients<typename DerivedQ::Scalar> gradients;
  detail::attention_backward_reference_unchecked(q, k, v, d_out, options, gradients, weights);
  return gradients;
}

}  // namespace attn
