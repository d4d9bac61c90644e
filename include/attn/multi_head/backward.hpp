#pragma once
/// @file
/// `MultiHeadAttention::backward_into`: the gradients of a loss through the module, of its
/// inputs and of its parameters, and `MultiHeadGradients`, which holds them in attn's layout
/// and hands them out in PyTorch's.

#include <type_traits>

#include <Eigen/Core>

#include "../backward.hpp"
#include "../detail/operands.hpp"
#include "../error.hpp"
#include "../flash.hpp"
#include "../rope.hpp"
#include "module.hpp"

namespace attn {

/// The gradients of a loss through a `MultiHeadAttention`: of its inputs (the shapes of
/// query, key and value) and of its parameters, in attn's X·W layout, each the shape of the
/// parameter it belongs to (`query_weight` E×E like `MultiHeadAttention::query_weight()`,
/// and so on; the biases are empty for a module without bias). The `torch_…` accessors give
/// them in `nn.MultiheadAttention`'s layout, named as PyTorch names its parameters.
template <typename Scalar>
struct MultiHeadGradients {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

  Matrix d_query, d_key, d_value;
  Matrix query_weight, key_weight, value_weight, output_weight;
  RowVector query_bias, key_bias, value_bias, output_bias;

  /// `in_proj_weight`'s gradient, (E + 2·H_kv·d)×E, rows q | k | v: for modules whose kdim
  /// and vdim are E (otherwise PyTorch has q/k/v_proj_weight, below).
  Matrix torch_in_proj_weight() const {
    Matrix stacked(query_weight.cols() + key_weight.cols() + value_weight.cols(), query_weight.rows());
    stacked << query_weight.transpose(), key_weight.transpose(), value_weight.transpose();
    return stacked;
  }
  Matrix torch_q_proj_weight() const { return query_weight.transpose(); }
  Matrix torch_k_proj_weight() const { return key_weight.transpose(); }
  Matrix torch_v_proj_weight() const { return value_weight.transpose(); }
  /// `in_proj_bias`'s gradient, E + 2·H_kv·d entries (empty without bias).
  RowVector torch_in_proj_bias() const {
    RowVector stacked(query_bias.size() + key_bias.size() + value_bias.size());
    stacked << query_bias, key_bias, value_bias;
    return stacked;
  }
  Matrix torch_out_proj_weight() const { return output_weight.transpose(); }
  RowVector torch_out_proj_bias() const { return output_bias; }
};

/// Scratch for `MultiHeadAttention::backward_into`, reusable across calls: the recomputed
/// forward (projections, heads' outputs, log-sum-exp), the heads' gradients, and the
/// tiled backward pass's workspace. Grows to the largest call seen and never shrinks.
template <typename Scalar>
struct MultiHeadBackwardWorkspace {
  MultiHeadWorkspace<Scalar> forward;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> lse;        // (n_q × H)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_context;  // (n_q × E)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_queries;  // (n_q × E)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_keys;     // (n_k × H_kv·d)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_values;   // (n_k × H_kv·d)
  BackwardWorkspace<Scalar> attention;

  std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(lse.size() + d_context.size() + d_queries.size() + d_keys.size() +
                                    d_values.size()) *
               sizeof(Scalar) +
           forward.bytes() + attention.bytes();
  }
};

using MultiHeadBackwardWorkspacef = MultiHeadBackwardWorkspace<float>;
using MultiHeadBackwardWorkspaced = MultiHeadBackwardWorkspace<double>;

namespace detail {

/// A projection's gradients, given its input x and the gradient of its output d_y
/// (y = x·W + b): dW = xᵀ·d_y, db = the column sums of d_y, dx = d_y·Wᵀ.
template <typename X, typename DY, typename Weight, typename DW, typename DB, typename DX>
void projection_backward(const X& x, const DY& d_y, const Weight& weight, bool has_bias, DW& d_weight, DB& d_bias,
                         DX& d_x) {
  d_weight.noalias() = x.transpose() * d_y;
  if (has_bias) {
    d_bias = d_y.colwise().sum();
  } else {
    d_bias.resize(0);
  }
  d_x.noalias() = d_y * weight.transpose();
}

}  // namespace detail

template <typename Scalar>
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut>
void MultiHeadAttention<Scalar>::backward_into(const Eigen::MatrixBase<DerivedQ>& query,
                                               const Eigen::MatrixBase<DerivedK>& key,
                                               const Eigen::MatrixBase<DerivedV>& value,
                                               const AttentionOptions<Scalar>& options,
                                               const Eigen::MatrixBase<DerivedDOut>& d_out,
                                               MultiHeadGradients<Scalar>& gradients,
                                               MultiHeadBackwardWorkspace<Scalar>& workspace) const {
  constexpr const char* operation = "attn::MultiHeadAttention::backward";
  check_inputs(operation, query, key, value, options);
  static_assert(std::is_same_v<typename DerivedDOut::Scalar, Scalar>,
                "attn::MultiHeadAttention: d_out must have the module's scalar type");
  const Eigen::Index n_q = query.rows();
  const Eigen::Index n_k = key.rows();
  detail::require_shape(operation, detail::operand("d_out", d_out), n_q, embed_dim(), "n_q x embed_dim");

  // The forward again: projections, RoPE, the heads (with their log-sum-exp).
  // Named views, not a structured binding: the lambdas below cannot capture one in C++17.
  const Projected projected = project_inputs(query, key, value, workspace.forward);
  auto queries = projected.queries;
  auto keys = projected.keys;
  auto values = projected.values;
  auto context = projected.context;
  rotate(queries, keys);
  detail::grow_to(workspace.lse, n_q, num_heads());
  auto lse = workspace.lse.topLeftCorner(n_q, num_heads());
  with_mods(n_q, n_k, [&](const auto& mods) {
    detail::flash_attention_unchecked(queries, keys, values, heads(), options, mods, context, lse,
                                      workspace.forward.flash);
  });

  // out = context·W_o + b_o
  detail::grow_to(workspace.d_context, n_q, embed_dim());
  auto d_context = workspace.d_context.topLeftCorner(n_q, embed_dim());
  detail::projection_backward(context, d_out, output_weight(), has_bias(), gradients.output_weight,
                              gradients.output_bias, d_context);

  // The heads: dQ, dK, dV of the rotated projections.
  detail::grow_to(workspace.d_queries, n_q, embed_dim());
  detail::grow_to(workspace.d_keys, n_k, kv_width());
  detail::grow_to(workspace.d_values, n_k, kv_width());
  auto d_queries = workspace.d_queries.topLeftCorner(n_q, embed_dim());
  auto d_keys = workspace.d_keys.topLeftCorner(n_k, kv_width());
  auto d_values = workspace.d_values.topLeftCorner(n_k, kv_width());
  BackwardInputs<Scalar> forward_results;
  forward_results.out = context;
  forward_results.lse = lse;
  with_mods(n_q, n_k, [&](const auto& mods) {
    detail::flash_attention_backward_unchecked(queries, keys, values, d_context, heads(), options, forward_results,
                                               mods, d_queries, d_keys, d_values, workspace.attention);
  });

  // RoPE is a rotation per position: its gradient is the rotation back, by minus the angle.
  if (rope()) {
    const Eigen::Index query_offset = n_k - n_q;
    detail::apply_rope_unchecked(d_queries, [query_offset](Eigen::Index r) { return -(query_offset + r); },
                                 head_dim(), *rope());
    detail::apply_rope_unchecked(d_keys, [](Eigen::Index r) { return -r; }, head_dim(), *rope());
  }

  // The input projections.
  detail::projection_backward(query, d_queries, query_weight(), has_bias(), gradients.query_weight,
                              gradients.query_bias, gradients.d_query);
  detail::projection_backward(key, d_keys, key_weight(), has_bias(), gradients.key_weight, gradients.key_bias,
                              gradients.d_key);
  detail::projection_backward(value, d_values, value_weight(), has_bias(), gradients.value_weight,
                              gradients.value_bias, gradients.d_value);
}

template <typename Scalar>
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut>
MultiHeadGradients<Scalar> MultiHeadAttention<Scalar>::backward(const Eigen::MatrixBase<DerivedQ>& query,
                                                                const Eigen::MatrixBase<DerivedK>& key,
                                                                const Eigen::MatrixBase<DerivedV>& value,
                                                                const Eigen::MatrixBase<DerivedDOut>& d_out,
                                                                const AttentionOptions<Scalar>& options) const {
  MultiHeadGradients<Scalar> gradients;
  MultiHeadBackwardWorkspace<Scalar> workspace;
  backward_into(query, key, value, options, d_out, gradients, workspace);
  return gradients;
}

}  // namespace attn
