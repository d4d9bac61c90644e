#pragma once
/// @file
/// What a `MultiHeadAttention` holds: its shape (`MultiHeadOptions`), its four projections'
/// weights and biases in attn's X·W convention, its positions (RoPE, ALiBi slopes), and how
/// they are set, from attn's convention or from PyTorch's `nn.MultiheadAttention` tensors as
/// stored. What the module computes with them is in module.hpp.

#include <optional>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "../alibi.hpp"
#include "../detail/operands.hpp"
#include "../error.hpp"
#include "../mods.hpp"
#include "../rope.hpp"

namespace attn {

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

/// The parameters of a multi-head attention module (the base of `MultiHeadAttention`,
/// which documents the computation). A new module's weights and biases are zero.
template <typename Scalar>
class MultiHeadParameters {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

  MultiHeadParameters(Eigen::Index embed_dim, Eigen::Index num_heads, MultiHeadOptions options = {})
      : embed_dim_(embed_dim),
        num_heads_(num_heads),
        num_kv_heads_(options.num_kv_heads == 0 ? num_heads : options.num_kv_heads),
        kdim_(options.kdim == 0 ? embed_dim : options.kdim),
        vdim_(options.vdim == 0 ? embed_dim : options.vdim),
        bias_(options.bias),
        rope_(options.rope) {
    detail::require_floating_point<Scalar>();
    const auto fail = [&](const char* rule) {
      detail::raise<std::invalid_argument>(operation_, rule, ", got embed_dim = ", embed_dim,
                                           ", num_heads = ", num_heads, ", num_kv_heads = ", options.num_kv_heads,
                                           ", kdim = ", options.kdim, ", vdim = ", options.vdim);
    };
    if (embed_dim < 1 || num_heads < 1 || options.num_kv_heads < 0 || options.kdim < 0 || options.vdim < 0) {
      fail(": embed_dim and num_heads must be positive, num_kv_heads, kdim and vdim non-negative (0 = default)");
    }
    if (embed_dim % num_heads != 0) fail(": embed_dim must be divisible by num_heads");
    if (num_heads % num_kv_heads_ != 0) fail(": num_heads must be a multiple of num_kv_heads");
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
    if (!bias_) detail::raise<std::invalid_argument>(operation, ": the module was built with bias = false");
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
      detail::raise<std::invalid_argument>(
          operation, ": kdim = ", kdim_, " and vdim = ", vdim_, " differ from embed_dim = ", embed_dim_,
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

 protected:
  static constexpr const char* operation_ = "attn::MultiHeadAttention";

  Heads heads() const noexcept { return Heads{num_heads_, num_kv_heads_}; }

  /// out = x·weight (+ bias in every row).
  template <typename DerivedX, typename Out>
  void project(const Eigen::MatrixBase<DerivedX>& x, const Matrix& weight, const RowVector& bias, Out& out) const {
    out.noalias() = x * weight;
    if (bias_) out.rowwise() += bias;
  }

 private:
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
      detail::raise_shape(operation, detail::operand(name, vector), "a vector of ", size, " entries");
    }
  }

  template <typename Derived>
  void check_torch_bias(const char* operation, const char* name, const Eigen::MatrixBase<Derived>& vector,
                        Eigen::Index size) const {
    if (bias_) {
      check_vector(operation, name, vector, size);
    } else if (vector.size() != 0) {
      detail::raise<dimension_error>(operation, ": ", name, " is ", detail::Shape{vector.rows(), vector.cols()},
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

}  // namespace attn
