#pragma once
/// @file
/// `attn::MultiHeadAttention`: what the module computes with its parameters
/// (parameters.hpp): the projections, the heads' attention in the tiled kernel (or, when the
/// weights are asked for, the reference path), the output projection. Batches are in
/// batch.hpp, decoding with a KV cache in decode.hpp.

#include <cstddef>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../alibi.hpp"
#include "../attention.hpp"
#include "../detail/operands.hpp"
#include "../error.hpp"
#include "../flash.hpp"
#include "../kv_cache.hpp"
#include "../mods.hpp"
#include "../options.hpp"
#include "../precision.hpp"
#include "../rope.hpp"
#include "parameters.hpp"

namespace attn {

template <typename Scalar>
struct MultiHeadGradients;
template <typename Scalar>
struct MultiHeadBackwardWorkspace;

/// Which attention weights `MultiHeadAttention::forward` hands back, as PyTorch's
/// `average_attn_weights`: the mean over heads (n_q×n_k), or every head's, stacked as
/// (H·n_q)×n_k with head h in rows [h·n_q, (h+1)·n_q) (PyTorch's (H, n_q, n_k) in C order).
enum class AttentionWeights { averaged, per_head };

/// Scratch for `MultiHeadAttention`, reusable across calls: the projected queries, keys
/// and values, the heads' outputs before the output projection, the tiled kernel's
/// workspace, and a score matrix when weights are asked for. It grows to the largest call
/// it has seen and never shrinks, so a loop of same-sized calls allocates on the first
/// only. Not safe to share between calls running at the same time.
template <typename Scalar>
struct MultiHeadWorkspace {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> queries;  // (n_q × E)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> keys;     // (n_k × H_kv·d)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> values;   // (n_k × H_kv·d)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> context;  // (n_q × E), heads side by side
  detail::row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> scores;  // (n_q × n_k), weights only
  Workspace<Scalar> flash;

  std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(queries.size() + keys.size() + values.size() + context.size() + scores.size()) *
               sizeof(Scalar) +
           flash.bytes();
  }
};

using MultiHeadWorkspacef = MultiHeadWorkspace<float>;
using MultiHeadWorkspaced = MultiHeadWorkspace<double>;

/// Multi-head attention with its four projections:
///
///     Q = query·W_q + b_q      (n_q × E),         E = embed_dim = H·d
///     K = key·W_k + b_k        (n_k × H_kv·d)
///     V = value·W_v + b_v      (n_k × H_kv·d)
///     head h = softmax(scale·Q_h·K_gᵀ, masked)·V_g,  g = h / (H / H_kv), scale = 1/√d
///     out = [head 0 | … | head H−1]·W_o + b_o   (n_q × E)
///
/// with Q_h the columns [h·d, (h+1)·d) of Q. The weights are in attn's X·W convention
/// (W_q is E×E, mapping columns), the transpose of PyTorch's Linear layout; `load_torch`
/// takes PyTorch's tensors as they are and transposes them once. A new module's weights
/// and biases are zero.
///
/// Masks are attn's (`AttentionOptions`: `true` = may attend, the opposite of PyTorch's
/// boolean `attn_mask` and `key_padding_mask`; causal aligned bottom-right) and apply to
/// every head. A query whose keys are all masked gets a head output of zeros, so its output
/// row is b_o, where PyTorch returns NaN.
template <typename Scalar>
class MultiHeadAttention : public MultiHeadParameters<Scalar> {
  using Parameters = MultiHeadParameters<Scalar>;

 public:
  using typename Parameters::Matrix;
  using typename Parameters::RowVector;
  using Parameters::Parameters;
  using Parameters::embed_dim, Parameters::has_bias, Parameters::head_dim, Parameters::kdim, Parameters::kv_width, Parameters::num_heads,
      Parameters::num_kv_heads, Parameters::vdim, Parameters::rope, Parameters::alibi_slopes;
  using Parameters::query_weight, Parameters::key_weight, Parameters::value_weight, Parameters::output_weight;
  using Parameters::query_bias, Parameters::key_bias, Parameters::value_bias, Parameters::output_bias;

  /// Attention of `query` (n_q×E) over `key` (n_k×kdim) and `value` (n_k×vdim), written
  /// into `out` (n_q×E; a plain matrix is resized). Self-attention passes the same matrix
  /// three times. With the workspace and `out` kept across same-sized calls, attn allocates
  /// nothing; Eigen's products for the projections allocate their blocking buffers when
  /// the matrices outgrow EIGEN_STACK_ALLOCATION_LIMIT (in float, from about E = 256 at a
  /// few hundred tokens). `out` must not alias an input.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Out>
  void forward_into(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                    const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options, Out&& out,
                    MultiHeadWorkspace<Scalar>& workspace) const {
    constexpr const char* operation = "attn::MultiHeadAttention::forward";
    detail::require_writable<Out>();
    check_inputs(operation, query, key, value, options);
    detail::fit_output(operation, "out", out, query.rows(), embed_dim());
    forward_unchecked(query, key, value, options, out, workspace);
  }

  /// As above, also writing the attention weights the output was computed with into
  /// `weights`: n_q×n_k averaged over heads, or (H·n_q)×n_k per head (see
  /// `AttentionWeights`). This path materialises one head's n_q×n_k scores at a time and
  /// runs on the calling thread, whatever `options.num_threads` says.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Out, typename Weights>
  void forward_into(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                    const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options, Out&& out,
                    AttentionWeights which, Weights&& weights, MultiHeadWorkspace<Scalar>& workspace) const {
    constexpr const char* operation = "attn::MultiHeadAttention::forward";
    detail::require_writable<Out>();
    detail::require_writable<Weights>();
    check_inputs(operation, query, key, value, options);
    const Eigen::Index n_q = query.rows();
    const Eigen::Index n_k = key.rows();
    detail::fit_output(operation, "out", out, n_q, embed_dim());
    detail::fit_output(operation, "weights", weights, which == AttentionWeights::per_head ? num_heads() * n_q : n_q, n_k);
    // Named views, not a structured binding: the lambda below cannot capture one in C++17.
    const Projected projected = project_inputs(query, key, value, workspace);
    auto queries = projected.queries;
    auto keys = projected.keys;
    auto values = projected.values;
    auto context = projected.context;
    detail::grow_to(workspace.scores, n_q, n_k);
    auto scores = workspace.scores.topLeftCorner(n_q, n_k);
    rotate(queries, keys);

    const Eigen::Index d = head_dim();
    const Eigen::Index group = num_heads() / num_kv_heads();
    if (which == AttentionWeights::averaged) weights.setZero();
    with_mods(n_q, n_k, [&](const auto& mods) {
      for (Eigen::Index head = 0; head < num_heads(); ++head) {
        const Eigen::Index kv_head = head / group;
        // head output: (n_q × d), the head's weights in `scores`
        detail::attention_unchecked(queries.middleCols(head * d, d), keys.middleCols(kv_head * d, d),
                                    values.middleCols(kv_head * d, d), options, mods, head,
                                    context.middleCols(head * d, d), scores);
        if (which == AttentionWeights::per_head) {
          weights.middleRows(head * n_q, n_q) = scores;
        } else {
          weights += scores;
        }
      }
    });
    // PyTorch's mean over heads: the sum, divided once.
    if (which == AttentionWeights::averaged) weights /= static_cast<Scalar>(num_heads());
    project_output(context, out);
  }

  /// Attention as a new n_q×E matrix (allocates its output and scratch; loops should keep
  /// both and call `forward_into`).
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options = {}) const {
    Matrix out;
    MultiHeadWorkspace<Scalar> workspace;
    forward_into(query, key, value, options, out, workspace);
    return out;
  }

  /// Attention as a new n_q×E matrix, handing back the attention weights in `weights`
  /// (PyTorch's `need_weights = True`, with `average_attn_weights` chosen by `which`).
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Weights>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options,
                 AttentionWeights which, Weights&& weights) const {
    Matrix out;
    MultiHeadWorkspace<Scalar> workspace;
    forward_into(query, key, value, options, out, which, weights, workspace);
    return out;
  }

  /// Self-attention of each sequence in a batch, the sequences of any lengths (no padding):
  /// `forward(x, x, x, options)` for each x, run in parallel across sequences when
  /// `options.num_threads` allows (and across heads when the batch has fewer sequences than
  /// threads). The options apply to every sequence, so they cannot hold a mask or a bias
  /// (their shape belongs to one sequence); causal, window and scale are fine.
  template <typename Sequence>
  std::vector<Matrix> forward_batch(const std::vector<Sequence>& sequences,
                                    const AttentionOptions<Scalar>& options = {}) const {
    return forward_batch(sequences, sequences, sequences, options);
  }

  /// Cross-attention of each query sequence over its own key and value sequences. Defined
  /// in batch.hpp.
  template <typename SequenceQ, typename SequenceK, typename SequenceV>
  std::vector<Matrix> forward_batch(const std::vector<SequenceQ>& queries, const std::vector<SequenceK>& keys,
                                    const std::vector<SequenceV>& values,
                                    const AttentionOptions<Scalar>& options = {}) const;

  /// The gradients of a loss through `forward(query, key, value, options)`, given
  /// dLoss/dout (n_q×E): of the three inputs and of every parameter (`MultiHeadGradients`,
  /// in attn's layout, with PyTorch's at hand), through the projections, RoPE, ALiBi, GQA
  /// and every mask. The forward is recomputed (its activations are not kept), then the
  /// tiled backward pass runs: bitwise the same at any `options.num_threads`. For
  /// self-attention, the input's gradient is d_query + d_key + d_value. Defined in
  /// multi_head/backward.hpp.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut>
  void backward_into(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                     const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options,
                     const Eigen::MatrixBase<DerivedDOut>& d_out, MultiHeadGradients<Scalar>& gradients,
                     MultiHeadBackwardWorkspace<Scalar>& workspace) const;

  /// As above, as new matrices (allocates; training loops should call `backward_into`).
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut>
  MultiHeadGradients<Scalar> backward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                                      const Eigen::MatrixBase<DerivedV>& value,
                                      const Eigen::MatrixBase<DerivedDOut>& d_out,
                                      const AttentionOptions<Scalar>& options = {}) const;

  /// A KV cache shaped for this module: `num_layers` layers of `capacity` tokens, stored
  /// as `Storage`: the module's scalar, or bfloat16 or half for a float module (half the
  /// memory; each tile is converted back to float as the kernel reads it).
  template <typename Storage = Scalar>
  KVCache<Storage> make_cache(Eigen::Index num_layers, Eigen::Index capacity,
                              CacheOverflow on_overflow = CacheOverflow::throw_error) const {
    static_assert(std::is_same_v<detail::compute_scalar_t<Storage>, Scalar>,
                  "attn::MultiHeadAttention::make_cache: a cache stores the module's scalar, or bfloat16, "
                  "half or q8_0 for a float module");
    return KVCache<Storage>(num_layers, kv_width(), kv_width(), capacity, on_overflow, num_kv_heads());
  }

  /// A decode step: self-attention of the new tokens `x` (n_new×E, usually one row) over
  /// everything `layer` of `cache` holds plus themselves, always causal (bottom-right: new
  /// token i sees the cache and new tokens 0…i), so feeding a sequence in steps gives what
  /// one causal `forward` over it gives. Their keys and values are appended to the cache
  /// (which grows by n_new). Extra options (a window, a scale, a mask or bias of
  /// n_new×(size + n_new)) apply on top. The work per new token is O(E²) for its
  /// projections and O((size + n_new)·E) for the attention. With `out`, the workspace and
  /// the cache's capacity kept across steps, a one-token step allocates nothing, at any
  /// thread count (tested up to E = 512); several tokens at once may make Eigen allocate
  /// the blocking buffers of its matrix products. Overflowing the cache throws
  /// `capacity_error` or grows it (see `CacheOverflow`); if the step throws, the cache is
  /// left as it was. Defined in decode.hpp.
  template <typename DerivedX, typename Storage, typename Out>
  void decode_into(const Eigen::MatrixBase<DerivedX>& x, KVCache<Storage>& cache, Eigen::Index layer,
                   const AttentionOptions<Scalar>& options, Out&& out, MultiHeadWorkspace<Scalar>& workspace) const;

  /// A decode step as a new n_new×E matrix (allocates; loops should call `decode_into`).
  template <typename DerivedX, typename Storage>
  Matrix decode(const Eigen::MatrixBase<DerivedX>& x, KVCache<Storage>& cache, Eigen::Index layer,
                const AttentionOptions<Scalar>& options = {}) const {
    Matrix out;
    MultiHeadWorkspace<Scalar> workspace;
    decode_into(x, cache, layer, options, out, workspace);
    return out;
  }

 private:
  using Parameters::heads, Parameters::operation_, Parameters::project;

  /// `forward_into` after its checks, `out` sized.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Out>
  void forward_unchecked(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                         const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions<Scalar>& options, Out& out,
                         MultiHeadWorkspace<Scalar>& workspace) const {
    auto [queries, keys, values, context] = project_inputs(query, key, value, workspace);
    rotate(queries, keys);
    attend(queries, keys, values, options, context, workspace.flash);
    project_output(context, out);
  }

  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void check_inputs(const char* operation, const Eigen::MatrixBase<DerivedQ>& query,
                    const Eigen::MatrixBase<DerivedK>& key, const Eigen::MatrixBase<DerivedV>& value,
                    const AttentionOptions<Scalar>& options) const {
    detail::require_floating_point<typename DerivedQ::Scalar>();
    detail::require_same_scalar<DerivedQ, DerivedK, DerivedV>();
    static_assert(std::is_same_v<typename DerivedQ::Scalar, Scalar>,
                  "attn::MultiHeadAttention: inputs must have the module's scalar type");
    detail::require_shape(operation, detail::operand("query", query), query.rows(), embed_dim(), "n_q x embed_dim");
    detail::require_shape(operation, detail::operand("key", key), key.rows(), kdim(), "n_k x kdim");
    detail::require_shape(operation, detail::operand("value", value), key.rows(), vdim(), "key.rows() x vdim");
    detail::validate_options(operation, options, query.rows(), key.rows());
  }

  /// The workspace's views for one call: projected inputs and the heads' outputs.
  struct Projected {
    Eigen::Block<Matrix> queries;  // (n_q × E)
    Eigen::Block<Matrix> keys;     // (n_k × H_kv·d)
    Eigen::Block<Matrix> values;   // (n_k × H_kv·d)
    Eigen::Block<Matrix> context;  // (n_q × E), written by the attention
  };

  /// Projects the inputs into the workspace (grown to fit) and returns the views.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Projected project_inputs(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                           const Eigen::MatrixBase<DerivedV>& value, MultiHeadWorkspace<Scalar>& workspace) const {
    const Eigen::Index n_q = query.rows();
    const Eigen::Index n_k = key.rows();
    detail::grow_to(workspace.queries, n_q, embed_dim());
    detail::grow_to(workspace.keys, n_k, kv_width());
    detail::grow_to(workspace.values, n_k, kv_width());
    detail::grow_to(workspace.context, n_q, embed_dim());
    Projected projected{workspace.queries.topLeftCorner(n_q, embed_dim()), workspace.keys.topLeftCorner(n_k, kv_width()),
                        workspace.values.topLeftCorner(n_k, kv_width()),
                        workspace.context.topLeftCorner(n_q, embed_dim())};
    project(query, query_weight(), query_bias(), projected.queries);
    project(key, key_weight(), key_bias(), projected.keys);
    project(value, value_weight(), value_bias(), projected.values);
    return projected;
  }

  /// RoPE on the projected queries and keys, positions aligned bottom-right.
  template <typename Queries, typename Keys>
  void rotate(Queries& queries, Keys& keys) const {
    if (!rope()) return;
    apply_rope_inplace(queries, keys.rows() - queries.rows(), head_dim(), *rope());
    apply_rope_inplace(keys, 0, head_dim(), *rope());
  }

  /// Calls `run(mods)` with the module's modifiers for n_q queries over n_k keys: ALiBi's
  /// score modifier when the module has it, none otherwise.
  template <typename Run>
  void with_mods(Eigen::Index n_q, Eigen::Index n_k, const Run& run) const {
    if (alibi_slopes().size() != 0) {
      run(Mods{alibi_score_mod(alibi_slopes(), n_q, n_k), NoMaskMod{}});
    } else {
      run(Mods<>{});
    }
  }

  /// The heads' attention into `context`, through the tiled kernel's unchecked entry (the
  /// caller validated the options).
  template <typename Queries, typename Keys, typename Values, typename Context>
  void attend(const Queries& queries, const Keys& keys, const Values& values, const AttentionOptions<Scalar>& options,
              Context& context, Workspace<Scalar>& flash) const {
    with_mods(queries.rows(), keys.rows(), [&](const auto& mods) {
      detail::flash_attention_unchecked(queries, keys, values, heads(), options, mods, context, flash);
    });
  }

  template <typename Context, typename Out>
  void project_output(const Context& context, Out& out) const {
    // out: (n_q × E)
    project(context, output_weight(), output_bias(), out);
  }

};

using MultiHeadAttentionf = MultiHeadAttention<float>;
using MultiHeadAttentiond = MultiHeadAttention<double>;

}  // namespace attn
