#pragma once
// Plain double-precision loop references for the tests: written out from the definitions,
// sharing no code with the library, so that agreement means something.

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include <Eigen/Core>

namespace attn_test {

using Index = Eigen::Index;

// The matrix types the tests use, spelled once.
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using RowMajorMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

/// Which keys each query may attend and what is added to its scores, spelled out
/// independently of the library's options.
struct ReferenceMasks {
  bool causal = false;
  std::optional<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>> keep;  // true = may attend
  std::optional<Eigen::MatrixXd> bias;                                    // −∞ entries mask
  std::optional<Index> valid_keys;
  // FlashAttention's window_size: keys within [i + n_k − n_q − left, i + n_k − n_q + right],
  // −1 = unbounded on that side.
  std::optional<std::pair<Index, Index>> window;
};

/// The suite's mask cases: one kind of mask each, or all of them at once.
enum class MaskKind { none, causal, keep_mask, bias, valid_keys, window, all };

inline const char* name(MaskKind kind) {
  switch (kind) {
    case MaskKind::none: return "none";
    case MaskKind::causal: return "causal";
    case MaskKind::keep_mask: return "keep_mask";
    case MaskKind::bias: return "bias";
    case MaskKind::valid_keys: return "valid_keys";
    case MaskKind::window: return "window";
    case MaskKind::all: return "all";
  }
  return "?";
}

/// Central differences of `loss()` along every entry of `x`, which `loss` reads: each entry
/// is moved by ±h in place, then restored.
template <typename Parameter, typename Loss>
Parameter numeric_gradient(Parameter& x, const Loss& loss, double h = 1e-6) {
  Parameter gradient(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    for (Index c = 0; c < x.cols(); ++c) {
      const auto saved = x(r, c);
      x(r, c) = saved + h;
      const double plus = loss();
      x(r, c) = saved - h;
      const double minus = loss();
      x(r, c) = saved;
      gradient(r, c) = (plus - minus) / (2 * h);
    }
  }
  return gradient;
}

struct ReferenceResult {
  Eigen::MatrixXd output;   // (n_q × d_v)
  Eigen::MatrixXd weights;  // (n_q × n_k)
};

/// softmax(scale·q·kᵀ + bias, masked)·v, one query at a time, in double.
inline ReferenceResult reference_attention(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k,
                                           const Eigen::MatrixXd& v, double scale,
                                           const ReferenceMasks& masks = {}) {
  const Index n_q = q.rows();
  const Index n_k = k.rows();
  const Index d_k = q.cols();
  const Index d_v = v.cols();
  ReferenceResult result{Eigen::MatrixXd::Zero(n_q, d_v), Eigen::MatrixXd::Zero(n_q, n_k)};
  for (Index i = 0; i < n_q; ++i) {
    std::vector<double> score(static_cast<std::size_t>(n_k));
    std::vector<bool> kept(static_cast<std::size_t>(n_k));
    double max_score = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < n_k; ++j) {
      bool keep = true;
      if (masks.causal && j > i + (n_k - n_q)) keep = false;
      if (masks.keep && !(*masks.keep)(i, j)) keep = false;
      if (masks.valid_keys && j >= *masks.valid_keys) keep = false;
      if (masks.window) {
        const auto [left, right] = *masks.window;
        if (left >= 0 && j < i + (n_k - n_q) - left) keep = false;
        if (right >= 0 && j > i + (n_k - n_q) + right) keep = false;
      }
      double s = 0.0;
      for (Index d = 0; d < d_k; ++d) s += q(i, d) * k(j, d);
      s *= scale;
      if (masks.bias) s += (*masks.bias)(i, j);
      if (std::isinf(s) && s < 0) keep = false;
      kept[static_cast<std::size_t>(j)] = keep;
      score[static_cast<std::size_t>(j)] = s;
      if (keep && s > max_score) max_score = s;
    }
    double total = 0.0;
    for (Index j = 0; j < n_k; ++j) {
      if (kept[static_cast<std::size_t>(j)]) total += std::exp(score[static_cast<std::size_t>(j)] - max_score);
    }
    if (total == 0.0) continue;  // every key masked: zeros
    for (Index j = 0; j < n_k; ++j) {
      if (!kept[static_cast<std::size_t>(j)]) continue;
      const double p = std::exp(score[static_cast<std::size_t>(j)] - max_score) / total;
      result.weights(i, j) = p;
      for (Index c = 0; c < d_v; ++c) result.output(i, c) += p * v(j, c);
    }
  }
  return result;
}

/// x·w (+ bias) with a triple loop, in double.
inline Eigen::MatrixXd reference_project(const Eigen::MatrixXd& x, const Eigen::MatrixXd& w,
                                         const Eigen::RowVectorXd* bias = nullptr) {
  Eigen::MatrixXd out(x.rows(), w.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    for (Index c = 0; c < w.cols(); ++c) {
      double sum = bias ? (*bias)(c) : 0.0;
      for (Index i = 0; i < x.cols(); ++i) sum += x(r, i) * w(i, c);
      out(r, c) = sum;
    }
  }
  return out;
}

/// Uniform entries in [-range, range] from a fixed seed, so every run sees the same data.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> random_matrix(Index rows, Index cols, std::uint32_t seed,
                                                                    double range = 1.0) {
  std::mt19937 engine(seed);
  std::uniform_real_distribution<double> uniform(-range, range);
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
  for (Index c = 0; c < cols; ++c) {
    for (Index r = 0; r < rows; ++r) m(r, c) = static_cast<Scalar>(uniform(engine));
  }
  return m;
}

/// A keep-mask with each entry true with probability `keep_probability`.
inline Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> random_keep_mask(Index rows, Index cols,
                                                                            std::uint32_t seed,
                                                                            double keep_probability) {
  std::mt19937 engine(seed);
  std::bernoulli_distribution keep(keep_probability);
  Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
  for (Index c = 0; c < cols; ++c) {
    for (Index r = 0; r < rows; ++r) m(r, c) = keep(engine);
  }
  return m;
}

/// Absolute tolerance for comparing a `Scalar` computation against the double reference:
/// a few rounding errors per term of the longest sum involved (d_k for a score, n_k for a
/// softmax sum and a weighted sum), times the size of the values.
template <typename Scalar>
double tolerance(Index d_k, Index n_k, double magnitude = 1.0) {
  const double eps = static_cast<double>(std::numeric_limits<Scalar>::epsilon());
  return 8.0 * eps * static_cast<double>(d_k + n_k + 8) * std::max(1.0, magnitude);
}

struct ReferenceGradients {
  Eigen::MatrixXd dq, dk, dv, d_bias;
};

/// The gradients of Loss = Σ d_out ∘ O + Σ d_lse ∘ lse with respect to q, k, v (and the
/// bias), written out from the chain rule with loops, in double: O = P·V with
/// P = softmax(S), S = scale·q·kᵀ + bias (masked entries excluded), so
///   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS_ij = P_ij·(dP_ij − Σ_l P_il·dP_il + dL_i),
///   dQ = scale·dS·K,  dK = scale·dSᵀ·Q,  dBias = dS.
inline ReferenceGradients reference_attention_backward(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k,
                                                       const Eigen::MatrixXd& v, const Eigen::MatrixXd& d_out,
                                                       double scale, const ReferenceMasks& masks = {},
                                                       const Eigen::VectorXd* d_lse = nullptr) {
  const Eigen::MatrixXd p = reference_attention(q, k, v, scale, masks).weights;
  const Index n_q = q.rows(), n_k = k.rows(), d_k = q.cols(), d_v = v.cols();
  ReferenceGradients g{Eigen::MatrixXd::Zero(n_q, d_k), Eigen::MatrixXd::Zero(n_k, d_k),
                       Eigen::MatrixXd::Zero(n_k, d_v), Eigen::MatrixXd::Zero(n_q, n_k)};
  for (Index i = 0; i < n_q; ++i) {
    std::vector<double> d_p(static_cast<std::size_t>(n_k), 0.0);
    double row_dot = 0.0;
    for (Index j = 0; j < n_k; ++j) {
      for (Index c = 0; c < d_v; ++c) d_p[static_cast<std::size_t>(j)] += d_out(i, c) * v(j, c);
      row_dot += p(i, j) * d_p[static_cast<std::size_t>(j)];
    }
    for (Index j = 0; j < n_k; ++j) {
      const double d_s = p(i, j) * (d_p[static_cast<std::size_t>(j)] - row_dot + (d_lse ? (*d_lse)(i) : 0.0));
      g.d_bias(i, j) = d_s;
      for (Index c = 0; c < d_v; ++c) g.dv(j, c) += p(i, j) * d_out(i, c);
      for (Index c = 0; c < d_k; ++c) {
        g.dq(i, c) += scale * d_s * k(j, c);
        g.dk(j, c) += scale * d_s * q(i, c);
      }
    }
  }
  return g;
}

template <typename DerivedA, typename DerivedB>
double max_abs_difference(const Eigen::MatrixBase<DerivedA>& a, const Eigen::MatrixBase<DerivedB>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  if (a.size() == 0) return 0.0;
  const Eigen::MatrixXd difference = (a.template cast<double>() - b.template cast<double>()).cwiseAbs();
  // NaN would slip through maxCoeff; count it as an infinite difference.
  if (!difference.allFinite()) return std::numeric_limits<double>::infinity();
  return difference.maxCoeff();
}

}  // namespace attn_test
