#pragma once
/// @file
/// Step 3 of self-attention: the query, key and value projections Q = X·W_q, K = X·W_k,
/// V = X·W_v (Vaswani et al. 2017, "Attention Is All You Need", section 3.2), with one
/// token per row of X and weights mapping columns (d_model×d_k), as the worked example does.

#include <optional>
#include <utility>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

namespace detail {

template <typename DerivedX, typename DerivedW>
void check_projection(const char* operation, const Eigen::MatrixBase<DerivedX>& x,
                      const Eigen::MatrixBase<DerivedW>& w) {
  require_floating_point<typename DerivedX::Scalar>();
  require_same_scalar<DerivedX, DerivedW>();
  static_assert(extents_compatible(DerivedX::ColsAtCompileTime, DerivedW::RowsAtCompileTime),
                "attn::project: x must have as many columns (d_model) as w has rows");
  require_extents_match(operation, operand("x", x), Extent::columns, operand("w", w), Extent::rows);
}

template <typename DerivedW, typename DerivedB>
void check_bias(const char* operation, const char* weight_name, const Eigen::MatrixBase<DerivedW>& w,
                const char* bias_name, const Eigen::MatrixBase<DerivedB>& bias) {
  require_same_scalar<DerivedW, DerivedB>();
  static_assert(DerivedB::RowsAtCompileTime == 1 || DerivedB::ColsAtCompileTime == 1 ||
                    DerivedB::RowsAtCompileTime == Eigen::Dynamic || DerivedB::ColsAtCompileTime == Eigen::Dynamic,
                "attn::project: a bias must be a vector with one entry per output column");
  if (bias.rows() != 1 && bias.cols() != 1) raise_shape(operation, operand(bias_name, bias), "a vector");
  if (bias.size() != w.cols()) {
    raise<dimension_error>(operation, ": ", bias_name, " has ", bias.size(), " entries but ", weight_name, " has ",
                           w.cols(), " columns (", bias_name, " is ", Shape{bias.rows(), bias.cols()}, ", ",
                           weight_name, " is ", Shape{w.rows(), w.cols()}, ")");
  }
}

/// Adds a bias vector (row or column, already checked) to every row of `out`.
template <typename Out, typename DerivedB>
void add_bias_to_rows(Out& out, const Eigen::MatrixBase<DerivedB>& bias) {
  const auto bias_row = bias.reshaped(Eigen::fix<1>, bias.size());
  for (Eigen::Index row = 0; row < out.rows(); ++row) out.row(row) += bias_row;
}

}  // namespace detail

/// out = x·w, written into caller storage: (n×d_model)·(d_model×d_out) → n×d_out.
/// A plain `out` of another size is resized; a block or Map must already have the result's
/// shape. `out` must not alias `x` or `w`.
template <typename DerivedX, typename DerivedW, typename Out>
void project_into(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedW>& w, Out&& out) {
  detail::require_writable<Out>();
  detail::check_projection("attn::project_into", x, w);
  detail::fit_output("attn::project_into", "out", out, x.rows(), w.cols());
  // projection: (n × d_out)
  out.noalias() = x * w;
}

/// out = x·w + bias, with the bias (a vector of length d_out) added to every row.
template <typename DerivedX, typename DerivedW, typename DerivedB, typename Out>
void project_into(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedW>& w,
                  const Eigen::MatrixBase<DerivedB>& bias, Out&& out) {
  detail::require_writable<Out>();
  detail::check_projection("attn::project_into", x, w);
  detail::check_bias("attn::project_into", "w", w, "bias", bias);
  detail::fit_output("attn::project_into", "out", out, x.rows(), w.cols());
  out.noalias() = x * w;
  detail::add_bias_to_rows(out, bias);
}

/// x·w as a new matrix (n×d_out), fixed-size when x and w are.
template <typename DerivedX, typename DerivedW>
auto project(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedW>& w) {
  detail::check_projection("attn::project", x, w);
  detail::plain_matrix<typename DerivedX::Scalar, DerivedX::RowsAtCompileTime, DerivedW::ColsAtCompileTime> out(
      x.rows(), w.cols());
  out.noalias() = x * w;
  return out;
}

/// x·w + bias as a new matrix (n×d_out).
template <typename DerivedX, typename DerivedW, typename DerivedB>
auto project(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedW>& w,
             const Eigen::MatrixBase<DerivedB>& bias) {
  detail::check_projection("attn::project", x, w);
  detail::check_bias("attn::project", "w", w, "bias", bias);
  detail::plain_matrix<typename DerivedX::Scalar, DerivedX::RowsAtCompileTime, DerivedW::ColsAtCompileTime> out(
      x.rows(), w.cols());
  out.noalias() = x * w;
  detail::add_bias_to_rows(out, bias);
  return out;
}

/// The three projections of one sequence: one row per token.
template <typename Scalar, int Rows = Eigen::Dynamic, int DK = Eigen::Dynamic, int DV = Eigen::Dynamic>
struct QKV {
  Eigen::Matrix<Scalar, Rows, DK> q;  // queries: (n × d_k)
  Eigen::Matrix<Scalar, Rows, DK> k;  // keys:    (n × d_k)
  Eigen::Matrix<Scalar, Rows, DV> v;  // values:  (n × d_v)
};

/// The learned query, key and value weights of one attention head, with optional biases.
///
/// Sizes are template parameters defaulting to `Eigen::Dynamic`; with all of them fixed
/// (the worked example is `QKVProjection<float, 4, 3, 3>`), `project` of a fixed-size input
/// runs without touching the heap.
template <typename Scalar, int DModel = Eigen::Dynamic, int DK = Eigen::Dynamic, int DV = Eigen::Dynamic>
class QKVProjection {
 public:
  using QueryKeyWeights = Eigen::Matrix<Scalar, DModel, DK>;  // (d_model × d_k)
  using ValueWeights = Eigen::Matrix<Scalar, DModel, DV>;     // (d_model × d_v)
  using QueryKeyBias = Eigen::Matrix<Scalar, 1, DK>;
  using ValueBias = Eigen::Matrix<Scalar, 1, DV>;

  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  QKVProjection(const Eigen::MatrixBase<DerivedQ>& w_q, const Eigen::MatrixBase<DerivedK>& w_k,
                const Eigen::MatrixBase<DerivedV>& w_v)
      : w_q_(checked_weights(w_q, w_k, w_v)), w_k_(w_k), w_v_(w_v) {}

  template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedBQ, typename DerivedBK,
            typename DerivedBV>
  QKVProjection(const Eigen::MatrixBase<DerivedQ>& w_q, const Eigen::MatrixBase<DerivedK>& w_k,
                const Eigen::MatrixBase<DerivedV>& w_v, const Eigen::MatrixBase<DerivedBQ>& b_q,
                const Eigen::MatrixBase<DerivedBK>& b_k, const Eigen::MatrixBase<DerivedBV>& b_v)
      : w_q_(checked_weights(w_q, w_k, w_v)), w_k_(w_k), w_v_(w_v) {
    constexpr const char* operation = "attn::QKVProjection";
    detail::check_bias(operation, "w_q", w_q, "b_q", b_q);
    detail::check_bias(operation, "w_k", w_k, "b_k", b_k);
    detail::check_bias(operation, "w_v", w_v, "b_v", b_v);
    biases_.emplace(Biases{b_q.reshaped(Eigen::fix<1>, b_q.size()), b_k.reshaped(Eigen::fix<1>, b_k.size()),
                           b_v.reshaped(Eigen::fix<1>, b_v.size())});
  }

  Eigen::Index d_model() const noexcept { return w_q_.rows(); }
  Eigen::Index d_k() const noexcept { return w_q_.cols(); }
  Eigen::Index d_v() const noexcept { return w_v_.cols(); }

  const QueryKeyWeights& w_q() const noexcept { return w_q_; }
  const QueryKeyWeights& w_k() const noexcept { return w_k_; }
  const ValueWeights& w_v() const noexcept { return w_v_; }
  bool has_bias() const noexcept { return biases_.has_value(); }

  /// Writes Q, K and V of `x` (n×d_model) into caller storage (n×d_k, n×d_k, n×d_v).
  template <typename DerivedX, typename OutQ, typename OutK, typename OutV>
  void project_into(const Eigen::MatrixBase<DerivedX>& x, OutQ&& q, OutK&& k, OutV&& v) const {
    static_assert(std::is_same_v<typename DerivedX::Scalar, Scalar>,
                  "attn::QKVProjection::project: x must have the projection's scalar type");
    static_assert(detail::extents_compatible(DerivedX::ColsAtCompileTime, DModel),
                  "attn::QKVProjection::project: x must have d_model columns");
    detail::require_extents_match("attn::QKVProjection::project", detail::operand("x", x), detail::Extent::columns,
                                  detail::operand("w_q", w_q_), detail::Extent::rows);
    if (biases_) {
      attn::project_into(x, w_q_, biases_->q, q);
      attn::project_into(x, w_k_, biases_->k, k);
      attn::project_into(x, w_v_, biases_->v, v);
    } else {
      attn::project_into(x, w_q_, q);
      attn::project_into(x, w_k_, k);
      attn::project_into(x, w_v_, v);
    }
  }

  /// Q, K and V of `x` (n×d_model), fixed-size when x is.
  template <typename DerivedX>
  QKV<Scalar, DerivedX::RowsAtCompileTime, DK, DV> project(const Eigen::MatrixBase<DerivedX>& x) const {
    QKV<Scalar, DerivedX::RowsAtCompileTime, DK, DV> result;
    project_into(x, result.q, result.k, result.v);
    return result;
  }

 private:
  struct Biases {
    QueryKeyBias q;
    QueryKeyBias k;
    ValueBias v;
  };

  /// Runs before the members are built, so that a wrong shape throws instead of reaching
  /// Eigen's (release-disabled) assertion in a fixed-size member's constructor.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  static const DerivedQ& checked_weights(const Eigen::MatrixBase<DerivedQ>& w_q, const Eigen::MatrixBase<DerivedK>& w_k,
                            const Eigen::MatrixBase<DerivedV>& w_v) {
    detail::require_floating_point<Scalar>();
    static_assert(std::is_same_v<typename DerivedQ::Scalar, Scalar>,
                  "attn::QKVProjection: the weights must have the projection's scalar type");
    detail::require_same_scalar<DerivedQ, DerivedK, DerivedV>();
    static_assert(detail::extents_compatible(DerivedQ::ColsAtCompileTime, DerivedK::ColsAtCompileTime),
                  "attn::QKVProjection: w_q and w_k must have the same number of columns (d_k)");
    static_assert(detail::extents_compatible(DerivedQ::RowsAtCompileTime, DerivedK::RowsAtCompileTime) &&
                      detail::extents_compatible(DerivedQ::RowsAtCompileTime, DerivedV::RowsAtCompileTime),
                  "attn::QKVProjection: w_q, w_k and w_v must have the same number of rows (d_model)");
    constexpr const char* operation = "attn::QKVProjection";
    using detail::Extent;
    using detail::operand;
    detail::require_extents_match(operation, operand("w_q", w_q), Extent::columns, operand("w_k", w_k),
                                  Extent::columns);
    detail::require_extents_match(operation, operand("w_q", w_q), Extent::rows, operand("w_k", w_k), Extent::rows);
    detail::require_extents_match(operation, operand("w_q", w_q), Extent::rows, operand("w_v", w_v), Extent::rows);
    static_assert(detail::extents_compatible(DerivedQ::RowsAtCompileTime, DModel) &&
                      detail::extents_compatible(DerivedQ::ColsAtCompileTime, DK) &&
                      detail::extents_compatible(DerivedV::ColsAtCompileTime, DV),
                  "attn::QKVProjection: the weights' sizes differ from the projection's fixed sizes");
    const Eigen::Index d_model = DModel == Eigen::Dynamic ? w_q.rows() : DModel;
    const Eigen::Index d_k = DK == Eigen::Dynamic ? w_q.cols() : DK;
    const Eigen::Index d_v = DV == Eigen::Dynamic ? w_v.cols() : DV;
    detail::require_shape(operation, operand("w_q", w_q), d_model, d_k, "d_model x d_k");
    detail::require_shape(operation, operand("w_v", w_v), d_model, d_v, "d_model x d_v");
    return w_q.derived();
  }

  QueryKeyWeights w_q_;
  QueryKeyWeights w_k_;
  ValueWeights w_v_;
  std::optional<Biases> biases_;
};

/// Aliases for the common dynamic-size cases.
using QKVProjectionf = QKVProjection<float>;
using QKVProjectiond = QKVProjection<double>;

}  // namespace attn
