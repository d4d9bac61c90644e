// MultiHeadAttention::backward: the gradients of every input and parameter, against
// finite differences of the module's own forward (in double, through GQA, RoPE, ALiBi,
// masks and kdim/vdim), and against PyTorch's autograd of nn.MultiheadAttention
// (tests/fixtures/torch_mha_grad/, made by make_mha_grad_fixtures.py).

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <type_traits>

#include <attn/attn.hpp>
#include <attn/npy.hpp>

#include "attn_test.hpp"
#include "fixture_files.hpp"
#include "reference.hpp"

using attn_test::Index;
using attn_test::numeric_gradient;

namespace {

struct ModuleCase {
  std::string name;
  Index embed_dim, num_heads;
  attn::MultiHeadOptions shape;
  Index n_q, n_k;
  bool causal;
};

}  // namespace

TEST_CASE("MultiHeadAttention::backward: every gradient is the loss's finite difference",
          "[backward][multi_head]") {
  attn::MultiHeadOptions gqa_rope;
  gqa_rope.num_kv_heads = 2;
  gqa_rope.rope = attn::Rope{10000.0, attn::RopeStyle::halves};
  attn::MultiHeadOptions alibi;
  alibi.alibi = true;
  alibi.rope = attn::Rope{500.0, attn::RopeStyle::interleaved};
  attn::MultiHeadOptions cross;
  cross.kdim = 5;
  cross.vdim = 7;
  cross.bias = false;
  cross.num_kv_heads = 1;
  const ModuleCase c = GENERATE_COPY(values<ModuleCase>({{"mha causal", 8, 2, {}, 6, 6, true},
                                                          {"gqa rope cross-length causal", 8, 4, gqa_rope, 3, 7, true},
                                                          {"alibi interleaved rope", 8, 2, alibi, 5, 5, false},
                                                          {"kdim vdim no bias mqa", 6, 3, cross, 4, 9, false}}));
  INFO(c.name);
  attn::MultiHeadAttentiond module(c.embed_dim, c.num_heads, c.shape);
  Eigen::MatrixXd w_q = attn_test::random_matrix<double>(c.embed_dim, c.embed_dim, 1);
  Eigen::MatrixXd w_k = attn_test::random_matrix<double>(module.kdim(), module.kv_width(), 2);
  Eigen::MatrixXd w_v = attn_test::random_matrix<double>(module.vdim(), module.kv_width(), 3);
  Eigen::MatrixXd w_o = attn_test::random_matrix<double>(c.embed_dim, c.embed_dim, 4);
  Eigen::RowVectorXd b_q = attn_test::random_matrix<double>(1, c.embed_dim, 5);
  Eigen::RowVectorXd b_k = attn_test::random_matrix<double>(1, module.kv_width(), 6);
  Eigen::RowVectorXd b_v = attn_test::random_matrix<double>(1, module.kv_width(), 7);
  Eigen::RowVectorXd b_o = attn_test::random_matrix<double>(1, c.embed_dim, 8);
  Eigen::MatrixXd query = attn_test::random_matrix<double>(c.n_q, c.embed_dim, 9);
  Eigen::MatrixXd key = attn_test::random_matrix<double>(c.n_k, module.kdim(), 10);
  Eigen::MatrixXd value = attn_test::random_matrix<double>(c.n_k, module.vdim(), 11);
  const Eigen::MatrixXd d_out = attn_test::random_matrix<double>(c.n_q, c.embed_dim, 12);
  attn::AttentionOptionsd options;
  options.causal = c.causal;

  const auto loss = [&]() {
    module.set_weights(w_q, w_k, w_v, w_o);
    if (module.has_bias()) module.set_biases(b_q, b_k, b_v, b_o);
    return (module.forward(query, key, value, options).array() * d_out.array()).sum();
  };
  loss();  // sets the parameters
  const auto g = module.backward(query, key, value, d_out, options);
  const double tolerance = 1e-7;
  CHECK(attn_test::max_abs_difference(g.d_query, numeric_gradient(query, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.d_key, numeric_gradient(key, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.d_value, numeric_gradient(value, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.query_weight, numeric_gradient(w_q, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.key_weight, numeric_gradient(w_k, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.value_weight, numeric_gradient(w_v, loss)) < tolerance);
  CHECK(attn_test::max_abs_difference(g.output_weight, numeric_gradient(w_o, loss)) < tolerance);
  if (module.has_bias()) {
    CHECK(attn_test::max_abs_difference(g.query_bias, numeric_gradient(b_q, loss)) < tolerance);
    CHECK(attn_test::max_abs_difference(g.key_bias, numeric_gradient(b_k, loss)) < tolerance);
    CHECK(attn_test::max_abs_difference(g.value_bias, numeric_gradient(b_v, loss)) < tolerance);
    CHECK(attn_test::max_abs_difference(g.output_bias, numeric_gradient(b_o, loss)) < tolerance);
  } else {
    CHECK(g.query_bias.size() == 0);
    CHECK(g.output_bias.size() == 0);
  }
}

namespace {

namespace fs = std::filesystem;


/// |attn − PyTorch| within `relative` of the largest PyTorch entry, compared as columns
/// (PyTorch's biases are 1-D, attn's row vectors).
template <typename Got>
void check_close(const std::string& name, const Got& got, const Eigen::MatrixXd& expected, double relative) {
  INFO(name);
  REQUIRE(got.size() == expected.size());
  const Eigen::MatrixXd got_d = got.template cast<double>();
  const double bound = relative * std::max(1.0, expected.cwiseAbs().maxCoeff());
  const Eigen::MatrixXd expected_shaped = expected.reshaped(got_d.rows(), got_d.cols());
  CHECK(attn_test::max_abs_difference(got_d, expected_shaped) <= bound);
}

}  // namespace

TEMPLATE_TEST_CASE("MultiHeadAttention::backward matches PyTorch's autograd of nn.MultiheadAttention",
                   "[backward][multi_head][torch]", float, double) {
  using Scalar = TestType;
  using M = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  const std::string name =
      GENERATE("self_basic", "causal", "cross", "kdim_vdim", "no_bias", "float_mask", "key_padding");
  INFO("fixture: " << name);
  const fs::path directory = attn_test::fixture_directory("torch_mha_grad", name);
  const auto config = attn_test::read_config(directory);
  const auto load = [&](const std::string& file) { return attn::npy::load<Scalar>(directory / (file + ".npy")); };
  const auto expected = [&](const std::string& file) {
    return attn::npy::load<double>(directory / (file + (is_float ? ".npy" : "_f64.npy")));
  };
  attn::MultiHeadOptions shape;
  shape.kdim = config.at("kdim");
  shape.vdim = config.at("vdim");
  shape.bias = config.at("bias") == 1;
  attn::MultiHeadAttention<Scalar> module(config.at("embed_dim"), config.at("num_heads"), shape);
  const M in_proj_bias = shape.bias ? load("in_proj_bias") : M();
  const M out_proj_bias = shape.bias ? load("out_proj_bias") : M();
  const bool separate = config.at("separate_proj") == 1;
  if (separate) {
    module.load_torch(load("q_proj_weight"), load("k_proj_weight"), load("v_proj_weight"), in_proj_bias,
                      load("out_proj_weight"), out_proj_bias);
  } else {
    module.load_torch(load("in_proj_weight"), in_proj_bias, load("out_proj_weight"), out_proj_bias);
  }
  const M query = load("query"), key = load("key"), value = load("value"), d_out = load("d_out");
  attn::AttentionOptions<Scalar> options;
  attn_test::BoolMatrix keep;
  if (config.at("has_keep_mask") == 1) {
    keep = load("keep_mask").array() != Scalar(0);
    options.mask = keep;
  }
  M float_mask;
  if (config.at("has_float_mask") == 1) {
    float_mask = load("attn_mask_float");
    options.bias = float_mask;
  }
  if (config.at("valid_keys") >= 0) options.valid_keys = config.at("valid_keys");

  const auto g = module.backward(query, key, value, d_out, options);
  // PyTorch's float32 run carries its own rounding (2.8e-7 of the largest entry against its
  // float64 run): float within 2e-5, double within 1e-11.
  const double relative = is_float ? 2e-5 : 1e-11;
  check_close("d_query", g.d_query, expected("d_query"), relative);
  check_close("d_key", g.d_key, expected("d_key"), relative);
  check_close("d_value", g.d_value, expected("d_value"), relative);
  if (separate) {
    check_close("d_q_proj_weight", g.torch_q_proj_weight(), expected("d_q_proj_weight"), relative);
    check_close("d_k_proj_weight", g.torch_k_proj_weight(), expected("d_k_proj_weight"), relative);
    check_close("d_v_proj_weight", g.torch_v_proj_weight(), expected("d_v_proj_weight"), relative);
  } else {
    check_close("d_in_proj_weight", g.torch_in_proj_weight(), expected("d_in_proj_weight"), relative);
  }
  check_close("d_out_proj_weight", g.torch_out_proj_weight(), expected("d_out_proj_weight"), relative);
  if (shape.bias) {
    check_close("d_in_proj_bias", g.torch_in_proj_bias(), expected("d_in_proj_bias"), relative);
    check_close("d_out_proj_bias", g.torch_out_proj_bias(), expected("d_out_proj_bias"), relative);
  }
}
