#pragma once
/// @file
/// `attn::MultiHeadAttention`: multi-head attention (Vaswani et al. 2017, "Attention Is All
/// You Need", section 3.2.2) with PyTorch's `nn.MultiheadAttention` weights and numbers,
/// grouped-query and multi-query attention (Ainslie et al. 2023, "GQA"; Shazeer 2019),
/// cross-attention from key and value inputs of other widths, batches of sequences of
/// different lengths, and decoding token by token with a `KVCache`.
///
/// The attention itself runs in the tiled kernel (flash.hpp): no n_q×n_k matrix exists
/// unless the attention weights are asked for.

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "alibi.hpp"
#include "detail/eigen_types.hpp"
#include "detail/parallel.hpp"
#include "error.hpp"
#include "flash.hpp"
#include "kv_cache.hpp"
#include "mask.hpp"
#include "options.hpp"
#include "rope.hpp"
#include "scores.hpp"
#include "softmax.hpp"

namespace attn {

/// Which attention weights `MultiHeadAttention::forward` hands back, as PyTorch's
/// `average_attn_weights`: the mean over heads (n_q×n_k), or every head's, stacked as
/// (H·n_q)×n_k with head h in rows [h·n_q, (h+1)·n_q) (PyTorch's (H, n_q, n_k) in C order).
enum class AttentionWeights { averaged, per_head };

/// The shape of a `MultiHeadAttention` beyond embed_dim and num_heads; 0 means "as
/// PyTorch's default".
struct MultiHeadOptions {
  /// Key/value heads: num_heads (0, the default) is multi-head attention, a divisor of it
  /// grouped-query attention, 1 multi-query attention.
  Eigen::Index num_kv_heads = 0;
  /// Width of the key input (PyTorch's `kdim`); 0: embed_dim.
  Eigen::Index kdim = 0;
  /// Width of the value input (PyTorch's `vdim`); 0: embed_dim.
  Eigen::Index vdim = 0;
  /// Biases on the four projections (PyTorch's `bias`).
  bool bias = true;
  /// Rotary position embedding of the projected queries and keys (RoFormer, Llama);
  /// PyTorch's nn.MultiheadAttention has none. Positions are aligned bottom-right like the
  /// causal rule: key j sits at position j and query i at i + n_k − n_q, so in a decode
  /// step the new tokens continue where the cache ends.
  std::optional<Rope> rope;
  /// ALiBi (Press et al. 2022): each head's scores get −m_h·|query position − key position|
  /// added, with the paper's slopes m_h (`alibi_slopes`) and the positions above, computed
  /// in the tile loop (no n_q×n_k bias matrix).
  bool alibi = false;
};

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
  detail::RowMajorDynamic<Scalar> scores;                         // (n_q × n_k), weights only
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
class MultiHeadAttention {
  static_assert(!Eigen::NumTraits<Scalar>::IsInteger, "attn requires a floating-point scalar (float or double)");

 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

  MultiHeadAttention(Eigen::Index embed_dim, Eigen::Index num_heads, MultiHeadOptions options = {})
      : embed_dim_(embed_dim),
        num_heads_(num_heads),
        num_kv_heads_(options.num_kv_heads == 0 ? num_heads : options.num_kv_heads),
        kdim_(options.kdim == 0 ? embed_dim : options.kdim),
        vdim_(options.vdim == 0 ? embed_dim : options.vdim),
        bias_(options.bias),
        rope_(options.rope) {
    const auto numbers = [&] {
      return "embed_dim = " + std::to_string(embed_dim) + ", num_heads = " + std::to_string(num_heads) +
             ", num_kv_heads = " + std::to_string(options.num_kv_heads) + ", kdim = " + std::to_string(options.kdim) +
             ", vdim = " + std::to_string(options.vdim);
    };
    if (embed_dim < 1 || num_heads < 1 || options.num_kv_heads < 0 || options.kdim < 0 || options.vdim < 0) {
      detail::throw_invalid_argument(std::string(operation_) +
                                     ": embed_dim and num_heads must be positive, num_kv_heads, kdim and vdim "
                                     "non-negative (0 = default), got " + numbers());
    }
    if (embed_dim % num_heads != 0) {
      detail::throw_invalid_argument(std::string(operation_) + ": embed_dim must be divisible by num_heads, got " +
                                     numbers());
    }
    if (num_heads % num_kv_heads_ != 0) {
      detail::throw_invalid_argument(std::string(operation_) + ": num_heads must be a multiple of num_kv_heads, got " +
                                     numbers());
    }
    if (rope_) detail::check_rope_parameters(operation_, embed_dim_, head_dim(), *rope_);
    if (options.alibi) alibi_slopes_ = attn::alibi_slopes<Scalar>(num_heads_);
    query_weight_.setZero(embed_dim_, embed_dim_);
    key_weight_.setZero(kdim_, kv_width());
    value_weight_.setZero(vdim_, kv_width());
    output_weight_.setZero(embed_dim_, embed_dim_);
    if (bias_) {
      query_bias_.setZero(embed_dim_);
      key_bias_.setZero(kv_width());
      value_bias_.setZero(kv_width());
      output_bias_.setZero(embed_dim_);
    }
  }

  Eigen::Index embed_dim() const noexcept { return embed_dim_; }
  Eigen::Index num_heads() const noexcept { return num_heads_; }
  Eigen::Index num_kv_heads() const noexcept { return num_kv_heads_; }
  /// d = embed_dim / num_heads, the width of each head's queries, keys and values.
  Eigen::Index head_dim() const noexcept { return embed_dim_ / num_heads_; }
  Eigen::Index kdim() const noexcept { return kdim_; }
  Eigen::Index vdim() const noexcept { return vdim_; }
  /// Columns of the projected keys and values: num_kv_heads·head_dim.
  Eigen::Index kv_width() const noexcept { return num_kv_heads_ * head_dim(); }
  bool has_bias() const noexcept { return bias_; }
  const std::optional<Rope>& rope() const noexcept { return rope_; }
  /// The ALiBi slopes, one per head; empty without ALiBi.
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& alibi_slopes() const noexcept { return alibi_slopes_; }

  /// The weights in attn's convention: W_q (E×E), W_k (kdim×H_kv·d), W_v (vdim×H_kv·d),
  /// W_o (E×E); head h's projection is columns [h·d, (h+1)·d) of W_q, KV head g's columns
  /// [g·d, (g+1)·d) of W_k and W_v, and head h's output rows [h·d, (h+1)·d) of W_o.
  const Matrix& query_weight() const noexcept { return query_weight_; }
  const Matrix& key_weight() const noexcept { return key_weight_; }
  const Matrix& value_weight() const noexcept { return value_weight_; }
  const Matrix& output_weight() const noexcept { return output_weight_; }
  /// The biases as row vectors (added to every token's row); empty without bias.
  const RowVector& query_bias() const noexcept { return query_bias_; }
  const RowVector& key_bias() const noexcept { return key_bias_; }
  const RowVector& value_bias() const noexcept { return value_bias_; }
  const RowVector& output_bias() const noexcept { return output_bias_; }

  /// Sets the four weights in attn's X·W convention (shapes as `query_weight()` etc.).
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedO>
  void set_weights(const Eigen::MatrixBase<DerivedQ>& query_weight, const Eigen::MatrixBase<DerivedK>& key_weight,
                   const Eigen::MatrixBase<DerivedV>& value_weight, const Eigen::MatrixBase<DerivedO>& output_weight) {
    constexpr const char* operation = "attn::MultiHeadAttention::set_weights";
    check_tensor(operation, "query_weight", query_weight, embed_dim_, embed_dim_, "embed_dim x embed_dim");
    check_tensor(operation, "key_weight", key_weight, kdim_, kv_width(), "kdim x num_kv_heads*head_dim");
    check_tensor(operation, "value_weight", value_weight, vdim_, kv_width(), "vdim x num_kv_heads*head_dim");
    check_tensor(operation, "output_weight", output_weight, embed_dim_, embed_dim_, "embed_dim x embed_dim");
    query_weight_ = query_weight;
    key_weight_ = key_weight;
    value_weight_ = value_weight;
    output_weight_ = output_weight;
  }

  /// Sets the four biases (vectors of E, H_kv·d, H_kv·d and E entries); a module built
  /// with `bias = false` takes none and throws.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedO>
  void set_biases(const Eigen::MatrixBase<DerivedQ>& query_bias, const Eigen::MatrixBase<DerivedK>& key_bias,
                  const Eigen::MatrixBase<DerivedV>& value_bias, const Eigen::MatrixBase<DerivedO>& output_bias) {
    constexpr const char* operation = "attn::MultiHeadAttention::set_biases";
    if (!bias_) detail::throw_invalid_argument(std::string(operation) + ": the module was built with bias = false");
    check_vector(operation, "query_bias", query_bias, embed_dim_);
    check_vector(operation, "key_bias", key_bias, kv_width());
    check_vector(operation, "value_bias", value_bias, kv_width());
    check_vector(operation, "output_bias", output_bias, embed_dim_);
    query_bias_ = query_bias.reshaped(1, embed_dim_);
    key_bias_ = key_bias.reshaped(1, kv_width());
    value_bias_ = value_bias.reshaped(1, kv_width());
    output_bias_ = output_bias.reshaped(1, embed_dim_);
  }

  /// Loads PyTorch `nn.MultiheadAttention`'s parameters as they are stored (each a Linear's
  /// [out, in]): `in_proj_weight` ((E + 2·H_kv·d)×E, rows q | k | v, so 3E×E without GQA),
  /// `in_proj_bias` (E + 2·H_kv·d entries), `out_proj.weight` (E×E), `out_proj.bias` (E).
  /// Without bias, pass empty matrices for the biases (PyTorch has None there). For a module
  /// whose kdim or vdim differ from E, PyTorch stores separate projections: use the
  /// six-argument form.
  template <typename DerivedIn, typename DerivedInBias, typename DerivedOut, typename DerivedOutBias>
  void load_torch(const Eigen::MatrixBase<DerivedIn>& in_proj_weight, const Eigen::MatrixBase<DerivedInBias>& in_proj_bias,
                  const Eigen::MatrixBase<DerivedOut>& out_proj_weight,
                  const Eigen::MatrixBase<DerivedOutBias>& out_proj_bias) {
    constexpr const char* operation = "attn::MultiHeadAttention::load_torch";
    if (kdim_ != embed_dim_ || vdim_ != embed_dim_) {
      detail::throw_invalid_argument(
          std::string(operation) + ": kdim = " + std::to_string(kdim_) + " and vdim = " + std::to_string(vdim_) +
          " differ from embed_dim = " + std::to_string(embed_dim_) +
          ", so PyTorch stores q_proj_weight, k_proj_weight and v_proj_weight: use the six-argument load_torch");
    }
    const Eigen::Index rows = embed_dim_ + 2 * kv_width();
    check_tensor(operation, "in_proj_weight", in_proj_weight, rows, embed_dim_,
                 "(embed_dim + 2*num_kv_heads*head_dim) x embed_dim");
    check_tensor(operation, "out_proj_weight", out_proj_weight, embed_dim_, embed_dim_, "embed_dim x embed_dim");
    check_torch_bias(operation, "in_proj_bias", in_proj_bias, rows);
    check_torch_bias(operation, "out_proj_bias", out_proj_bias, embed_dim_);
    query_weight_ = in_proj_weight.topRows(embed_dim_).transpose();
    key_weight_ = in_proj_weight.middleRows(embed_dim_, kv_width()).transpose();
    value_weight_ = in_proj_weight.bottomRows(kv_width()).transpose();
    output_weight_ = out_proj_weight.transpose();
    load_torch_biases(in_proj_bias, out_proj_bias);
  }

  /// Loads PyTorch's separate projections, used when kdim or vdim differ from E:
  /// `q_proj_weight` (E×E), `k_proj_weight` (H_kv·d × kdim), `v_proj_weight`
  /// (H_kv·d × vdim), with `in_proj_bias` (E + 2·H_kv·d, rows q | k | v) and out_proj as
  /// above. Empty biases without bias.
  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedInBias, typename DerivedOut,
            typename DerivedOutBias>
  void load_torch(const Eigen::MatrixBase<DerivedQ>& q_proj_weight, const Eigen::MatrixBase<DerivedK>& k_proj_weight,
                  const Eigen::MatrixBase<DerivedV>& v_proj_weight, const Eigen::MatrixBase<DerivedInBias>& in_proj_bias,
                  const Eigen::MatrixBase<DerivedOut>& out_proj_weight,
                  const Eigen::MatrixBase<DerivedOutBias>& out_proj_bias) {
    constexpr const char* operation = "attn::MultiHeadAttention::load_torch";
    check_tensor(operation, "q_proj_weight", q_proj_weight, embed_dim_, embed_dim_, "embed_dim x embed_dim");
    check_tensor(operation, "k_proj_weight", k_proj_weight, kv_width(), kdim_, "num_kv_heads*head_dim x kdim");
    check_tensor(operation, "v_proj_weight", v_proj_weight, kv_width(), vdim_, "num_kv_heads*head_dim x vdim");
    check_tensor(operation, "out_proj_weight", out_proj_weight, embed_dim_, embed_dim_, "embed_dim x embed_dim");
    check_torch_bias(operation, "in_proj_bias", in_proj_bias, embed_dim_ + 2 * kv_width());
    check_torch_bias(operation, "out_proj_bias", out_proj_bias, embed_dim_);
    query_weight_ = q_proj_weight.transpose();
    key_weight_ = k_proj_weight.transpose();
    value_weight_ = v_proj_weight.transpose();
    output_weight_ = out_proj_weight.transpose();
    load_torch_biases(in_proj_bias, out_proj_bias);
  }

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
    detail::fit_output(operation, "out", out, query.rows(), embed_dim_);
    auto [queries, keys, values, context] = project_inputs(query, key, value, workspace);
    rotate(queries, keys);
    attend(queries, keys, values, options, context, workspace.flash);
    project_output(context, out);
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
    detail::fit_output(operation, "out", out, n_q, embed_dim_);
    detail::fit_output(operation, "weights", weights, which == AttentionWeights::per_head ? num_heads_ * n_q : n_q, n_k);
    auto [queries, keys, values, context] = project_inputs(query, key, value, workspace);
    detail::grow_to(workspace.scores, n_q, n_k);
    auto scores = workspace.scores.topLeftCorner(n_q, n_k);
    rotate(queries, keys);

    const Eigen::Index d = head_dim();
    const Eigen::Index group = num_heads_ / num_kv_heads_;
    const Scalar scale = options.scale ? *options.scale : default_scale<Scalar>(d);
    if (which == AttentionWeights::averaged) weights.setZero();
    for (Eigen::Index head = 0; head < num_heads_; ++head) {
      const Eigen::Index kv_head = head / group;
      // scores: (n_q × n_k), then the head's weights
      scores.noalias() = scale * (queries.middleCols(head * d, d) * keys.middleCols(kv_head * d, d).transpose());
      if (alibi_slopes_.size() != 0) {
        const Scalar slope = alibi_slopes_(head);
        for (Eigen::Index i = 0; i < n_q; ++i) {
          for (Eigen::Index j = 0; j < n_k; ++j) {
            scores(i, j) -= slope * static_cast<Scalar>(std::abs(i + n_k - n_q - j));
          }
        }
      }
      detail::mask_scores_unchecked(scores, options);
      softmax_rows_inplace(scores);
      // head output: (n_q × d)
      context.middleCols(head * d, d).noalias() = scores * values.middleCols(kv_head * d, d);
      if (which == AttentionWeights::per_head) {
        weights.middleRows(head * n_q, n_q) = scores;
      } else {
        weights += scores;
      }
    }
    // PyTorch's mean over heads: the sum, divided once.
    if (which == AttentionWeights::averaged) weights /= static_cast<Scalar>(num_heads_);
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

  /// Cross-attention of each query sequence over its own key and value sequences.
  template <typename SequenceQ, typename SequenceK, typename SequenceV>
  std::vector<Matrix> forward_batch(const std::vector<SequenceQ>& queries, const std::vector<SequenceK>& keys,
                                    const std::vector<SequenceV>& values,
                                    const AttentionOptions<Scalar>& options = {}) const {
    constexpr const char* operation = "attn::MultiHeadAttention::forward_batch";
    if (keys.size() != queries.size() || values.size() != queries.size()) {
      detail::throw_dimension_error(std::string(operation) + ": the batch has " + std::to_string(queries.size()) +
                                    " query sequences but " + std::to_string(keys.size()) + " key and " +
                                    std::to_string(values.size()) + " value sequences");
    }
    if (!options.mask.empty() || !options.bias.empty()) {
      detail::throw_invalid_argument(std::string(operation) +
                                     ": options.mask and options.bias have one sequence's shape; pass per-sequence "
                                     "masks to forward() instead");
    }
    const Eigen::Index batch = static_cast<Eigen::Index>(queries.size());
    // Every check before any work, so that a bad sequence throws before threads start.
    for (Eigen::Index i = 0; i < batch; ++i) {
      const auto at = static_cast<std::size_t>(i);
      const std::string name = std::string(operation) + " (sequence " + std::to_string(i) + ")";
      check_inputs(name.c_str(), queries[at], keys[at], values[at], options);
    }
    std::vector<Matrix> outputs(queries.size());
    const int threads = detail::resolve_thread_count(options.num_threads);
    if (batch >= threads) {
      // Sequences in parallel, each on one thread.
      std::vector<MultiHeadWorkspace<Scalar>> workspaces(static_cast<std::size_t>(std::min<Eigen::Index>(threads, batch)));
      AttentionOptions<Scalar> sequential = options;
      sequential.num_threads = 1;
      detail::parallel_for(batch, static_cast<int>(workspaces.size()), [&](Eigen::Index i, int thread) {
        const auto at = static_cast<std::size_t>(i);
        forward_into(queries[at], keys[at], values[at], sequential, outputs[at],
                     workspaces[static_cast<std::size_t>(thread)]);
      });
    } else {
      // Fewer sequences than threads: one at a time, heads and query blocks in parallel.
      MultiHeadWorkspace<Scalar> workspace;
      for (std::size_t at = 0; at < queries.size(); ++at) {
        forward_into(queries[at], keys[at], values[at], options, outputs[at], workspace);
      }
    }
    return outputs;
  }

  /// A KV cache shaped for this module: `num_layers` layers of `capacity` tokens.
  KVCache<Scalar> make_cache(Eigen::Index num_layers, Eigen::Index capacity,
                             CacheOverflow on_overflow = CacheOverflow::throw_error) const {
    return KVCache<Scalar>(num_layers, kv_width(), kv_width(), capacity, on_overflow);
  }

  /// A decode step: self-attention of the new tokens `x` (n_new×E, usually one row) over
  /// everything `layer` of `cache` holds plus themselves. Their keys and values are
  /// appended to the cache (which grows by n_new), and the
  /// causal rule always applies (bottom-right: new token i sees the cache and new tokens
  /// 0…i), so feeding a sequence in steps gives what one causal `forward` over it gives.
  /// Extra options (a window, a scale, a mask or bias of n_new×(size + n_new)) apply on
  /// top. The work per new token is O(E²) for its projections and O((size + n_new)·E) for
  /// the attention. With `out`, the workspace and the cache's capacity kept across steps, a
  /// one-token step allocates nothing, at any thread count (tested up to E = 512); several
  /// tokens at once may make Eigen allocate the blocking buffers of its matrix products.
  /// Overflowing the cache throws `capacity_error` or grows it (see `CacheOverflow`); if the
  /// step throws, the cache is left as it was.
  template <typename DerivedX, typename Out>
  void forward_into(const Eigen::MatrixBase<DerivedX>& x, KVCache<Scalar>& cache, Eigen::Index layer,
                    const AttentionOptions<Scalar>& options, Out&& out, MultiHeadWorkspace<Scalar>& workspace) const {
    constexpr const char* operation = "attn::MultiHeadAttention::forward (decode step)";
    detail::require_writable<Out>();
    detail::require_floating_point<typename DerivedX::Scalar>();
    static_assert(std::is_same_v<typename DerivedX::Scalar, Scalar>,
                  "attn::MultiHeadAttention: inputs must have the module's scalar type");
    if (kdim_ != embed_dim_ || vdim_ != embed_dim_) {
      detail::throw_invalid_argument(std::string(operation) +
                                     ": a decode step is self-attention, which needs kdim = vdim = embed_dim, got "
                                     "kdim = " + std::to_string(kdim_) + ", vdim = " + std::to_string(vdim_) +
                                     ", embed_dim = " + std::to_string(embed_dim_));
    }
    detail::require_shape(operation, detail::operand("x", x), x.rows(), embed_dim_, "n_new x embed_dim");
    if (cache.key_width() != kv_width() || cache.value_width() != kv_width()) {
      detail::throw_dimension_error(std::string(operation) + ": cache holds keys of " +
                                    std::to_string(cache.key_width()) + " and values of " +
                                    std::to_string(cache.value_width()) +
                                    " columns but the module's are num_kv_heads*head_dim = " +
                                    std::to_string(kv_width()));
    }
    const Eigen::Index n_new = x.rows();
    const Eigen::Index n_past = cache.size(layer);
    const Eigen::Index n_total = n_past + n_new;
    AttentionOptions<Scalar> step = options;
    step.causal = true;
    detail::validate_options(operation, step, n_new, n_total);
    detail::fit_output(operation, "out", out, n_new, embed_dim_);

    // Everything that can allocate or throw, before the cache changes: the new tokens'
    // projections go to the workspace (column-major, where Eigen's products need no heap
    // for one token), the scratch is sized for the cache's whole capacity.
    auto [queries, keys, values, context] = project_inputs(x, x, x, workspace);
    if (rope_) {
      // The new tokens sit at positions n_past, n_past + 1, …: the cache keeps rotated keys.
      apply_rope_inplace(queries, n_past, head_dim(), *rope_);
      apply_rope_inplace(keys, n_past, head_dim(), *rope_);
    }
    reserve_decode(workspace.flash, n_new, std::max(cache.capacity(), n_total), step.num_threads);

    auto new_rows = cache.extend(layer, n_new);
    new_rows.keys = keys;
    new_rows.values = values;
    try {
      attend(queries, cache.keys(layer), cache.values(layer), step, context, workspace.flash);
    } catch (...) {
      cache.truncate(layer, n_past);
      throw;
    }
    project_output(context, out);
  }

  /// A decode step as a new n_new×E matrix (allocates; loops should call `forward_into`).
  template <typename DerivedX>
  Matrix forward(const Eigen::MatrixBase<DerivedX>& x, KVCache<Scalar>& cache, Eigen::Index layer,
                 const AttentionOptions<Scalar>& options = {}) const {
    Matrix out;
    MultiHeadWorkspace<Scalar> workspace;
    forward_into(x, cache, layer, options, out, workspace);
    return out;
  }

 private:
  static constexpr const char* operation_ = "attn::MultiHeadAttention";

  Heads heads() const noexcept { return Heads{num_heads_, num_kv_heads_}; }

  template <typename Derived>
  static void check_tensor(const char* operation, const char* name, const Eigen::MatrixBase<Derived>& tensor,
                           Eigen::Index rows, Eigen::Index cols, const char* expected) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "attn::MultiHeadAttention: weights must have the module's scalar type");
    detail::require_shape(operation, detail::operand(name, tensor), rows, cols, expected);
  }

  template <typename Derived>
  static void check_vector(const char* operation, const char* name, const Eigen::MatrixBase<Derived>& vector,
                           Eigen::Index size) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "attn::MultiHeadAttention: biases must have the module's scalar type");
    if ((vector.rows() != 1 && vector.cols() != 1) || vector.size() != size) {
      detail::throw_dimension_error(std::string(operation) + ": " + name + " is " +
                                    detail::shape_string(vector.rows(), vector.cols()) + " but must be a vector of " +
                                    std::to_string(size) + " entries");
    }
  }

  template <typename Derived>
  void check_torch_bias(const char* operation, const char* name, const Eigen::MatrixBase<Derived>& vector,
                        Eigen::Index size) const {
    if (bias_) {
      check_vector(operation, name, vector, size);
    } else if (vector.size() != 0) {
      detail::throw_dimension_error(std::string(operation) + ": " + name + " is " +
                                    detail::shape_string(vector.rows(), vector.cols()) +
                                    " but the module was built with bias = false (pass an empty matrix)");
    }
  }

  template <typename DerivedInBias, typename DerivedOutBias>
  void load_torch_biases(const Eigen::MatrixBase<DerivedInBias>& in_proj_bias,
                         const Eigen::MatrixBase<DerivedOutBias>& out_proj_bias) {
    if (!bias_) return;
    const auto in_bias = in_proj_bias.reshaped();
    query_bias_ = in_bias.head(embed_dim_).transpose();
    key_bias_ = in_bias.segment(embed_dim_, kv_width()).transpose();
    value_bias_ = in_bias.tail(kv_width()).transpose();
    output_bias_ = out_proj_bias.reshaped().transpose();
  }

  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void check_inputs(const char* operation, const Eigen::MatrixBase<DerivedQ>& query,
                    const Eigen::MatrixBase<DerivedK>& key, const Eigen::MatrixBase<DerivedV>& value,
                    const AttentionOptions<Scalar>& options) const {
    detail::require_floating_point<typename DerivedQ::Scalar>();
    detail::require_same_scalar<DerivedQ, DerivedK, DerivedV>();
    static_assert(std::is_same_v<typename DerivedQ::Scalar, Scalar>,
                  "attn::MultiHeadAttention: inputs must have the module's scalar type");
    detail::require_shape(operation, detail::operand("query", query), query.rows(), embed_dim_, "n_q x embed_dim");
    detail::require_shape(operation, detail::operand("key", key), key.rows(), kdim_, "n_k x kdim");
    detail::require_shape(operation, detail::operand("value", value), key.rows(), vdim_, "key.rows() x vdim");
    detail::validate_options(operation, options, query.rows(), key.rows());
  }

  /// out = x·weight (+ bias in every row).
  template <typename DerivedX, typename Out>
  void project(const Eigen::MatrixBase<DerivedX>& x, const Matrix& weight, const RowVector& bias, Out& out) const {
    out.noalias() = x * weight;
    if (bias_) out.rowwise() += bias;
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
    detail::grow_to(workspace.queries, n_q, embed_dim_);
    detail::grow_to(workspace.keys, n_k, kv_width());
    detail::grow_to(workspace.values, n_k, kv_width());
    detail::grow_to(workspace.context, n_q, embed_dim_);
    Projected projected{workspace.queries.topLeftCorner(n_q, embed_dim_), workspace.keys.topLeftCorner(n_k, kv_width()),
                        workspace.values.topLeftCorner(n_k, kv_width()),
                        workspace.context.topLeftCorner(n_q, embed_dim_)};
    project(query, query_weight_, query_bias_, projected.queries);
    project(key, key_weight_, key_bias_, projected.keys);
    project(value, value_weight_, value_bias_, projected.values);
    return projected;
  }

  /// RoPE on the projected queries and keys, positions aligned bottom-right.
  template <typename Queries, typename Keys>
  void rotate(Queries& queries, Keys& keys) const {
    if (!rope_) return;
    apply_rope_inplace(queries, keys.rows() - queries.rows(), head_dim(), *rope_);
    apply_rope_inplace(keys, 0, head_dim(), *rope_);
  }

  /// The heads' attention into `context`, through the tiled kernel, with ALiBi's score
  /// modifier when the module has it.
  template <typename Queries, typename Keys, typename Values, typename Context>
  void attend(const Queries& queries, const Keys& keys, const Values& values, const AttentionOptions<Scalar>& options,
              Context& context, Workspace<Scalar>& flash) const {
    if (alibi_slopes_.size() != 0) {
      const Mods mods{alibi_score_mod(alibi_slopes_, queries.rows(), keys.rows()), NoMaskMod{}};
      flash_attention_into(queries, keys, values, heads(), options, context, flash, mods);
    } else {
      flash_attention_into(queries, keys, values, heads(), options, context, flash);
    }
  }

  template <typename Context, typename Out>
  void project_output(const Context& context, Out& out) const {
    // out: (n_q × E)
    project(context, output_weight_, output_bias_, out);
  }

  /// Sizes the tiled kernel's scratch for any cache length up to `capacity`: its thread
  /// slots and the key split's partial results grow with the cache, and would otherwise
  /// make a later decode step allocate.
  void reserve_decode(Workspace<Scalar>& flash, Eigen::Index n_new, Eigen::Index capacity, int num_threads) const {
    const Eigen::Index d = head_dim();
    const Eigen::Index chunks = std::max<Eigen::Index>(1, (capacity + split_key_chunk - 1) / split_key_chunk);
    const auto threads = static_cast<int>(
        std::min<Eigen::Index>(detail::resolve_thread_count(num_threads), num_heads_ * chunks));
    detail::reserve_slots(flash, threads, default_block_q<Scalar>, default_block_k<Scalar>(d), d, d);
    detail::grow_to(flash.lse, n_new, num_heads_);
    if (n_new == 0 || n_new > default_block_q<Scalar>) return;
    detail::grow_to(flash.partial_out, num_heads_ * chunks * n_new, d);
    detail::grow_to(flash.partial_lse, num_heads_ * chunks * n_new, 1);
  }

  Eigen::Index embed_dim_;
  Eigen::Index num_heads_;
  Eigen::Index num_kv_heads_;
  Eigen::Index kdim_;
  Eigen::Index vdim_;
  bool bias_;
  std::optional<Rope> rope_;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> alibi_slopes_;
  Matrix query_weight_;
  Matrix key_weight_;
  Matrix value_weight_;
  Matrix output_weight_;
  RowVector query_bias_;
  RowVector key_bias_;
  RowVector value_bias_;
  RowVector output_bias_;
};

using MultiHeadAttentionf = MultiHeadAttention<float>;
using MultiHeadAttentiond = MultiHeadAttention<double>;

}  // namespace attn
