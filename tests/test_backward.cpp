// The backward pass: the tiled kernel's and the reference's gradients against a double
// loop written from the chain rule (itself checked by finite differences), against
// PyTorch's autograd (tests/fixtures/torch_grad/, made by make_grad_fixtures.py), through
// every mask, grouped-query heads, the log-sum-exp's gradient and a score modifier.

#include <cmath>
#include <filesystem>
#include <stdexcept>
#include <string>

#include <attn/attn.hpp>
#include <attn/npy.hpp>

#include "attn_test.hpp"
#include "fixture_files.hpp"
#include "reference.hpp"

namespace fs = std::filesystem;
using attn_test::ContainsSubstring;
using attn_test::Index;
using attn_test::Matrix;
using attn_test::numeric_gradient;

namespace {

/// Loss = Σ d_out ∘ attention(q, k, v): the quantity whose gradient the loop reference
/// claims to be, for finite differences.
double loss(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v,
            const Eigen::MatrixXd& d_out, const attn_test::ReferenceMasks& masks) {
  const double scale = 1.0 / std::sqrt(double(q.cols()));
  return (attn_test::reference_attention(q, k, v, scale, masks).output.array() * d_out.array()).sum();
}

/// The options and the loop reference's masks for one of the suite's mask cases.
template <typename Scalar>
struct MaskCase {
  attn::AttentionOptions<Scalar> options;
  attn_test::ReferenceMasks masks;
  attn_test::BoolMatrix keep;
  Matrix<Scalar> bias;
};

template <typename Scalar>
void set_mask_case(MaskCase<Scalar>& c, const std::string& name, Index n_q, Index n_k) {
  if (name == "causal") {
    c.options.causal = c.masks.causal = true;
  } else if (name == "keep-mask") {
    c.keep = attn_test::random_keep_mask(n_q, n_k, 21, 0.6);
    c.keep.row(1).setConstant(false);  // a row that attends nothing
    c.options.mask = c.keep;
    c.masks.keep = c.keep;
  } else if (name == "padding") {
    c.options.valid_keys = c.masks.valid_keys = n_k - 9;
  } else if (name == "window") {
    c.options.window = attn::SlidingWindow{5, 3};
    c.masks.window = std::make_pair(Index(5), Index(3));
  } else if (name == "bias") {
    c.bias = attn_test::random_matrix<Scalar>(n_q, n_k, 22, 2.0);
    c.bias(0, 3) = -std::numeric_limits<Scalar>::infinity();
    c.options.bias = c.bias;
    c.masks.bias = c.bias.template cast<double>();
  }
}


}  // namespace

TEST_CASE("the loop reference's gradients are the loss's finite differences", "[backward][reference]") {
  Eigen::MatrixXd q = attn_test::random_matrix<double>(4, 3, 1);
  Eigen::MatrixXd k = attn_test::random_matrix<double>(6, 3, 2);
  Eigen::MatrixXd v = attn_test::random_matrix<double>(6, 2, 3);
  const Eigen::MatrixXd d_out = attn_test::random_matrix<double>(4, 2, 4);
  attn_test::ReferenceMasks masks;
  masks.causal = GENERATE(false, true);
  const auto g = attn_test::reference_attention_backward(q, k, v, d_out, 1.0 / std::sqrt(3.0), masks);
  const auto dq = numeric_gradient(q, [&] { return loss(q, k, v, d_out, masks); });
  const auto dk = numeric_gradient(k, [&] { return loss(q, k, v, d_out, masks); });
  const auto dv = numeric_gradient(v, [&] { return loss(q, k, v, d_out, masks); });
  CHECK(attn_test::max_abs_difference(g.dq, dq) < 1e-8);
  CHECK(attn_test::max_abs_difference(g.dk, dk) < 1e-8);
  CHECK(attn_test::max_abs_difference(g.dv, dv) < 1e-8);
}

TEMPLATE_TEST_CASE("the tiled and the reference backward match the loop reference for every mask",
                   "[backward][masks]", float, double) {
  using Scalar = TestType;
  const Index n_q = 37, n_k = 53, d_k = 8, d_v = 5;
  const std::string name = GENERATE("none", "causal", "keep-mask", "padding", "window", "bias");
  INFO("mask: " << name);
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(n_q, d_k, 5, 2.0);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, d_k, 6, 2.0);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, d_v, 7);
  const Matrix<Scalar> d_out = attn_test::random_matrix<Scalar>(n_q, d_v, 8);
  MaskCase<Scalar> c;
  set_mask_case(c, name, n_q, n_k);
  const auto expected = attn_test::reference_attention_backward(
      q.template cast<double>(), k.template cast<double>(), v.template cast<double>(), d_out.template cast<double>(),
      1.0 / std::sqrt(double(d_k)), c.masks);
  // Gradients sum n_q or n_k terms of size ~|q|·|k|.
  const double tolerance = attn_test::tolerance<Scalar>(d_k, n_q + n_k, 4.0);

  const auto tiled = attn::attention_backward(q, k, v, d_out, c.options);
  // Small tiles: many per row and column, partial at both edges.
  const auto small_tiles = attn::flash_attention_backward<8, 16>(q, k, v, attn::Heads{}, d_out, c.options);
  Matrix<Scalar> weights;
  const auto reference = attn::attention_backward(q, k, v, d_out, c.options, weights);
  for (const auto* g : {&tiled, &small_tiles, &reference}) {
    CHECK(attn_test::max_abs_difference(g->dq, expected.dq) <= tolerance);
    CHECK(attn_test::max_abs_difference(g->dk, expected.dk) <= tolerance);
    CHECK(attn_test::max_abs_difference(g->dv, expected.dv) <= tolerance);
  }
  if (name == "bias") {
    CHECK(attn_test::max_abs_difference(reference.d_bias, expected.d_bias) <= tolerance);
    CHECK(reference.d_bias(0, 3) == Scalar(0));
  } else {
    CHECK(reference.d_bias.size() == 0);
  }
  if (name == "keep-mask") {
    // The row that attends nothing passes no gradient to its query.
    CHECK(tiled.dq.row(1).isZero(0));
    CHECK(reference.dq.row(1).isZero(0));
  }
}

TEMPLATE_TEST_CASE("grouped-query and multi-query heads: dK and dV sum over the query heads of a group",
                   "[backward][heads]", float, double) {
  using Scalar = TestType;
  const auto [num_heads, num_kv_heads, causal] =
      GENERATE(table<Index, Index, bool>({{4, 4, false}, {4, 2, false}, {3, 1, true}, {6, 2, true}}));
  INFO("H = " << num_heads << ", H_kv = " << num_kv_heads << ", causal = " << causal);
  const Index n_q = 19, n_k = 29, d_k = 6, d_v = 4;
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(n_q, num_heads * d_k, 9, 2.0);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, num_kv_heads * d_k, 10, 2.0);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, num_kv_heads * d_v, 11);
  const Matrix<Scalar> d_out = attn_test::random_matrix<Scalar>(n_q, num_heads * d_v, 12);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;
  const auto g = attn::flash_attention_backward<8, 16>(q, k, v, attn::Heads{num_heads, num_kv_heads}, d_out, options);
  REQUIRE(g.dq.rows() == n_q);
  REQUIRE(g.dk.cols() == num_kv_heads * d_k);
  Eigen::MatrixXd dk = Eigen::MatrixXd::Zero(n_k, num_kv_heads * d_k);
  Eigen::MatrixXd dv = Eigen::MatrixXd::Zero(n_k, num_kv_heads * d_v);
  attn_test::ReferenceMasks masks;
  masks.causal = causal;
  const Index group = num_heads / num_kv_heads;
  const double tolerance = attn_test::tolerance<Scalar>(d_k, group * (n_q + n_k), 4.0);
  for (Index h = 0; h < num_heads; ++h) {
    const Index kv = h / group;
    const auto expected = attn_test::reference_attention_backward(
        q.middleCols(h * d_k, d_k).template cast<double>(), k.middleCols(kv * d_k, d_k).template cast<double>(),
        v.middleCols(kv * d_v, d_v).template cast<double>(), d_out.middleCols(h * d_v, d_v).template cast<double>(),
        1.0 / std::sqrt(double(d_k)), masks);
    CHECK(attn_test::max_abs_difference(g.dq.middleCols(h * d_k, d_k), expected.dq) <= tolerance);
    dk.middleCols(kv * d_k, d_k) += expected.dk;
    dv.middleCols(kv * d_v, d_v) += expected.dv;
  }
  CHECK(attn_test::max_abs_difference(g.dk, dk) <= tolerance);
  CHECK(attn_test::max_abs_difference(g.dv, dv) <= tolerance);
}

TEMPLATE_TEST_CASE("the forward's out and lse, given, give the same bits as recomputing them; dL enters as P·dL",
                   "[backward][lse]", float, double) {
  using Scalar = TestType;
  const Index n_q = 23, n_k = 31, d = 8;
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(n_q, 2 * d, 13, 2.0);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, d, 14, 2.0);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, d, 15);
  const Matrix<Scalar> d_out = attn_test::random_matrix<Scalar>(n_q, 2 * d, 16);
  const Matrix<Scalar> d_lse = attn_test::random_matrix<Scalar>(n_q, 2, 17);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  const attn::Heads heads{2, 1};
  attn::Workspace<Scalar> forward_workspace;
  Matrix<Scalar> out, lse;
  attn::flash_attention_into(q, k, v, heads, options, out, lse, forward_workspace);

  attn::BackwardInputs<Scalar> kept;
  kept.out = out;
  kept.lse = lse;
  kept.d_lse = d_lse;
  attn::BackwardInputs<Scalar> recompute;
  recompute.d_lse = d_lse;
  const auto given = attn::flash_attention_backward(q, k, v, heads, d_out, options, kept);
  const auto recomputed = attn::flash_attention_backward(q, k, v, heads, d_out, options, recompute);
  CHECK(given.dq == recomputed.dq);
  CHECK(given.dk == recomputed.dk);
  CHECK(given.dv == recomputed.dv);

  attn_test::ReferenceMasks masks;
  masks.causal = true;
  const double tolerance = attn_test::tolerance<Scalar>(d, 2 * (n_q + n_k), 4.0);
  for (Index h = 0; h < 2; ++h) {
    const Eigen::VectorXd d_lse_head = d_lse.col(h).template cast<double>();
    const auto expected = attn_test::reference_attention_backward(
        q.middleCols(h * d, d).template cast<double>(), k.template cast<double>(), v.template cast<double>(),
        d_out.middleCols(h * d, d).template cast<double>(), 1.0 / std::sqrt(double(d)), masks, &d_lse_head);
    CHECK(attn_test::max_abs_difference(given.dq.middleCols(h * d, d), expected.dq) <= tolerance);
  }
}

namespace {

/// Soft-capping (Gemma 2): cap·tanh(score/cap), with its derivative for the backward pass.
struct SoftCap {
  double cap = 2.0;
  template <typename Scalar>
  Scalar operator()(Scalar score, Index, Index, Index) const {
    return Scalar(cap) * std::tanh(score / Scalar(cap));
  }
  template <typename Scalar>
  Scalar derivative(Scalar score, Index, Index, Index) const {
    const Scalar t = std::tanh(score / Scalar(cap));
    return Scalar(1) - t * t;
  }
};

}  // namespace

TEST_CASE("a score modifier's derivative carries the gradient through it", "[backward][mods]") {
  const Index n_q = 11, n_k = 13, d = 4;
  Eigen::MatrixXd q = attn_test::random_matrix<double>(n_q, d, 18, 3.0);
  Eigen::MatrixXd k = attn_test::random_matrix<double>(n_k, d, 19, 3.0);
  const Eigen::MatrixXd v = attn_test::random_matrix<double>(n_k, d, 20);
  const Eigen::MatrixXd d_out = attn_test::random_matrix<double>(n_q, d, 21);
  const attn::Mods mods{SoftCap{}, attn::NoMaskMod{}};
  attn::AttentionOptionsd options;
  const auto g = attn::flash_attention_backward<8, 16>(q, k, v, attn::Heads{}, d_out, options, {}, mods);
  // Finite differences of the soft-capped forward, through the tiled kernel itself.
  const auto loss_of = [&](const Eigen::MatrixXd& qq, const Eigen::MatrixXd& kk) {
    return (attn::flash_attention(qq, kk, v, attn::Heads{}, options, mods).array() * d_out.array()).sum();
  };
  const auto dq = numeric_gradient(q, [&] { return loss_of(q, k); });
  const auto dk = numeric_gradient(k, [&] { return loss_of(q, k); });
  CHECK(attn_test::max_abs_difference(g.dq, dq) < 1e-7);
  CHECK(attn_test::max_abs_difference(g.dk, dk) < 1e-7);
}

TEMPLATE_TEST_CASE("PyTorch's autograd: the gradients of every fixture", "[backward][torch]", float, double) {
  using Scalar = TestType;
  constexpr bool is_double = std::is_same_v<Scalar, double>;
  const std::string config = GENERATE("self_basic", "causal", "cross", "mask_random", "bias", "valid_keys_causal",
                                      "multi_head", "grouped_query", "multi_query_decode", "lse_grad", "scale",
                                      "causal_more_queries", "everything", "large");
  INFO("fixture: " << config);
  const fs::path directory = attn_test::fixture_directory("torch_grad", config);
  const auto settings = attn_test::read_config(directory);
  // The inputs are float32 numbers in both files: the same inputs for both scalars.
  const auto load = [&](const std::string& name) { return attn::npy::load<Scalar>(directory / (name + ".npy")); };
  const auto load_result = [&](const std::string& name) {
    return attn::npy::load<double>(directory / (name + (is_double ? "_f64.npy" : ".npy")));
  };
  const Matrix<Scalar> q = load("q"), k = load("k"), v = load("v"), d_out = load("d_out");
  attn::AttentionOptions<Scalar> options;
  options.scale = static_cast<Scalar>(attn::npy::load<double>(directory / "scale.npy")(0));
  options.causal = settings.at("causal") != 0;
  if (settings.at("valid_keys") >= 0) options.valid_keys = settings.at("valid_keys");
  attn_test::BoolMatrix keep;
  if (settings.at("has_mask") != 0) {
    keep = load("mask").array() != Scalar(0);
    options.mask = keep;
  }
  Matrix<Scalar> bias;
  if (settings.at("has_bias") != 0) {
    bias = load("bias");
    options.bias = bias;
  }
  Matrix<Scalar> d_lse;
  attn::BackwardInputs<Scalar> inputs;
  if (settings.at("has_d_lse") != 0) {
    d_lse = load("d_lse");
    inputs.d_lse = d_lse;
  }
  const attn::Heads heads{settings.at("num_heads"), settings.at("num_kv_heads")};
  const auto g = attn::flash_attention_backward<8, 16>(q, k, v, heads, d_out, options, inputs);
  const Index n = std::max(settings.at("n_q"), settings.at("n_k"));
  // PyTorch's float32 numbers carry their own rounding: compare float with float within
  // twice the suite's bound, double with double within it.
  const double tolerance = (is_double ? 1.0 : 2.0) * attn_test::tolerance<Scalar>(settings.at("d_k"), 4 * n, 4.0);
  CHECK(attn_test::max_abs_difference(g.dq, load_result("dq")) <= tolerance);
  CHECK(attn_test::max_abs_difference(g.dk, load_result("dk")) <= tolerance);
  CHECK(attn_test::max_abs_difference(g.dv, load_result("dv")) <= tolerance);
  if (heads.num_heads == 1 && settings.at("has_d_lse") == 0) {
    Matrix<Scalar> weights;
    const auto reference = attn::attention_backward(q, k, v, d_out, options, weights);
    CHECK(attn_test::max_abs_difference(reference.dq, load_result("dq")) <= tolerance);
    CHECK(attn_test::max_abs_difference(reference.dk, load_result("dk")) <= tolerance);
    if (settings.at("has_bias") != 0) {
      CHECK(attn_test::max_abs_difference(reference.d_bias, load_result("d_bias")) <= tolerance);
    }
  }
}

TEMPLATE_TEST_CASE("masked keys' and empty rows' garbage passes no gradient", "[backward][nonfinite]", float,
                   double) {
  using Scalar = TestType;
  const Index n_q = 9, n_k = 14, d = 4, valid = 10;
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(n_q, d, 23);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, d, 24);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, d, 25);
  const Matrix<Scalar> d_out = attn_test::random_matrix<Scalar>(n_q, d, 26);
  attn_test::BoolMatrix keep = attn_test::BoolMatrix::Constant(n_q, n_k, true);
  keep.row(4).setConstant(false);  // row 4 attends nothing: its query and d_out may be garbage
  attn::AttentionOptions<Scalar> options;
  options.valid_keys = valid;
  options.mask = keep;
  Matrix<Scalar> bad_q = q, bad_k = k, bad_v = v, bad_d_out = d_out;
  bad_k.bottomRows(n_k - valid).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  bad_v.bottomRows(n_k - valid).setConstant(std::numeric_limits<Scalar>::infinity());
  bad_q.row(4).setConstant(std::numeric_limits<Scalar>::infinity());
  bad_d_out.row(4).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  const auto clean = attn::flash_attention_backward<8, 16>(q, k, v, attn::Heads{}, d_out, options);
  const auto dirty = attn::flash_attention_backward<8, 16>(bad_q, bad_k, bad_v, attn::Heads{}, bad_d_out, options);
  const double tolerance = attn_test::tolerance<Scalar>(d, n_q + n_k, 4.0);
  CHECK(attn_test::max_abs_difference(dirty.dq, clean.dq) <= tolerance);
  CHECK(attn_test::max_abs_difference(dirty.dk, clean.dk) <= tolerance);
  CHECK(attn_test::max_abs_difference(dirty.dv, clean.dv) <= tolerance);
  CHECK(dirty.dk.bottomRows(n_k - valid).isZero(0));
  CHECK(dirty.dv.bottomRows(n_k - valid).isZero(0));
  CHECK(dirty.dq.row(4).isZero(0));
}

TEST_CASE("backward: a clear error for every mismatched operand", "[backward][errors]") {
  const Eigen::MatrixXf q = Eigen::MatrixXf::Ones(3, 4), k = Eigen::MatrixXf::Ones(5, 4), v = Eigen::MatrixXf::Ones(5, 2);
  const Eigen::MatrixXf d_out = Eigen::MatrixXf::Ones(3, 3);
  CHECK_THROWS_AS(attn::attention_backward(q, k, v, d_out), attn::dimension_error);
  CHECK_THROWS_WITH(attn::attention_backward(q, k, v, d_out),
                    ContainsSubstring("attn::flash_attention_backward_into: d_out is 3x3"));
  const Eigen::MatrixXf good_d_out = Eigen::MatrixXf::Ones(3, 2), lse = Eigen::MatrixXf::Zero(3, 1);
  attn::BackwardInputs<float> only_lse;
  only_lse.lse = lse;
  CHECK_THROWS_WITH(attn::flash_attention_backward(q, k, v, attn::Heads{}, good_d_out, {}, only_lse),
                    ContainsSubstring("out and lse both, or neither"));
  const Eigen::MatrixXf wrong_lse = Eigen::MatrixXf::Zero(3, 2);
  attn::BackwardInputs<float> bad;
  bad.out = good_d_out;
  bad.lse = wrong_lse;
  CHECK_THROWS_WITH(attn::flash_attention_backward(q, k, v, attn::Heads{}, good_d_out, {}, bad),
                    ContainsSubstring("inputs.lse is 3x2"));
  Eigen::MatrixXf weights;
  CHECK_THROWS_WITH(attn::attention_backward(q, k, v, d_out, {}, weights),
                    ContainsSubstring("attn::attention_backward: d_out is 3x3"));
}
