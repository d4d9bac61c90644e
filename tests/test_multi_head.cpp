// MultiHeadAttention: PyTorch 1.13 nn.MultiheadAttention's numbers from the committed
// fixtures (tests/fixtures/torch/, made by make_torch_fixtures.py), grouped-query attention
// against a plain loop, batches, decoding with a KV cache, and every error.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <attn/attn.hpp>
#include <attn/npy.hpp>

#include "attn_test.hpp"
#include "fixture_files.hpp"
#include "reference.hpp"

using attn_test::ContainsSubstring;
using attn_test::Matrix;
using attn_test::max_abs_difference;
using attn_test::random_matrix;
using Eigen::Index;

namespace fs = std::filesystem;

// The exception's type, and its message containing `text` (Catch2's message matchers
// compare whole messages).
#define ATTN_CHECK_THROWS_CONTAINING(expression, type, text) \
  do {                                                  \
    CHECK_THROWS_AS(expression, type);                  \
    CHECK_THROWS_WITH(expression, ContainsSubstring(text)); \
  } while (false)

namespace {

fs::path torch_fixture(const std::string& config) { return attn_test::fixture_directory("torch", config); }

using attn_test::read_config;

template <typename Scalar>
Matrix<Scalar> load(const fs::path& directory, const std::string& name) {
  return attn::npy::load<Scalar>(directory / (name + ".npy"));
}

/// The module a fixture describes, with PyTorch's parameters loaded as PyTorch stores them.
template <typename Scalar>
attn::MultiHeadAttention<Scalar> load_module(const fs::path& directory, std::map<std::string, Index>& config) {
  attn::MultiHeadOptions options;
  options.kdim = config.at("kdim");
  options.vdim = config.at("vdim");
  options.bias = config.at("bias") == 1;
  attn::MultiHeadAttention<Scalar> module(config.at("embed_dim"), config.at("num_heads"), options);
  // PyTorch has None for the biases of a module without bias: attn takes empty matrices.
  const Matrix<Scalar> in_proj_bias = options.bias ? load<Scalar>(directory, "in_proj_bias") : Matrix<Scalar>();
  const Matrix<Scalar> out_proj_bias = options.bias ? load<Scalar>(directory, "out_proj_bias") : Matrix<Scalar>();
  if (config.at("separate_proj") == 1) {
    module.load_torch(load<Scalar>(directory, "q_proj_weight"), load<Scalar>(directory, "k_proj_weight"),
                      load<Scalar>(directory, "v_proj_weight"), in_proj_bias, load<Scalar>(directory, "out_proj_weight"),
                      out_proj_bias);
  } else {
    module.load_torch(load<Scalar>(directory, "in_proj_weight"), in_proj_bias,
                      load<Scalar>(directory, "out_proj_weight"), out_proj_bias);
  }
  return module;
}

/// PyTorch's float32 outputs against attn's float: within 1e-5 of the largest entry; the
/// double path against PyTorch's float64 run of the same module: within 1e-12.
template <typename Scalar>
double parity_tolerance(const Matrix<Scalar>& expected) {
  const double relative = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  const double finite_max = expected.unaryExpr([](Scalar x) { return std::isnan(x) ? Scalar(0) : std::abs(x); })
                                .maxCoeff();
  return relative * std::max(1.0, double(finite_max));
}

template <typename Scalar>
std::string output_name(const std::string& base) {
  return std::is_same_v<Scalar, float> ? base : base + "_f64";
}

const std::vector<std::string> single_sequence_configs = {
    "self_basic",  "self_no_bias",     "cross",      "cross_kdim_vdim",         "kdim_vdim_no_bias",
    "causal_bool", "causal_float",     "bool_mask_random", "float_mask_random", "key_padding",
    "padding_and_causal_bool",         "large",      "single_token"};

}  // namespace

TEMPLATE_TEST_CASE("MultiHeadAttention matches PyTorch's nn.MultiheadAttention", "[multi_head][torch]", float,
                   double) {
  using Scalar = TestType;
  const std::string name = GENERATE(from_range(single_sequence_configs));
  CAPTURE(name);
  const fs::path directory = torch_fixture(name);
  auto config = read_config(directory);
  const auto module = load_module<Scalar>(directory, config);
  const Matrix<Scalar> query = load<Scalar>(directory, "query");
  const Matrix<Scalar> key = load<Scalar>(directory, "key");
  const Matrix<Scalar> value = load<Scalar>(directory, "value");
  const Index n_q = config.at("n_q");
  const Index n_k = config.at("n_k");

  // PyTorch's masks say true = masked; attn's keep-mask says true = may attend. The fixture
  // stores PyTorch's boolean masks as 1.0 = masked, so a key is kept where both are 0.
  attn::AttentionOptions<Scalar> options;
  attn_test::BoolMatrix keep = attn_test::BoolMatrix::Constant(n_q, n_k, true);
  Matrix<Scalar> float_mask;
  bool any_boolean_mask = false;
  if (config.at("has_attn_mask") == 1) {
    const Matrix<Scalar> attn_mask = load<Scalar>(directory, "attn_mask");
    if (config.at("attn_mask_is_bool") == 1) {
      keep = keep.array() && (attn_mask.array() == Scalar(0));
      any_boolean_mask = true;
    } else {
      float_mask = attn_mask;  // additive, as attn's bias
      options.bias = float_mask;
    }
  }
  if (config.at("has_key_padding_mask") == 1) {
    const Matrix<Scalar> padding = load<Scalar>(directory, "key_padding_mask");  // (n_k × 1), 1.0 = padding
    for (Index j = 0; j < n_k; ++j) {
      if (padding(j, 0) != Scalar(0)) keep.col(j).setConstant(false);
    }
    any_boolean_mask = true;
  }
  if (any_boolean_mask) options.mask = keep;

  const Matrix<Scalar> expected = load<Scalar>(directory, output_name<Scalar>("output"));
  const double tolerance = parity_tolerance<Scalar>(expected);
  // PyTorch returns NaN for a query whose keys are all masked; attn gives its heads zeros,
  // so its output row is out_proj.bias.
  std::vector<Index> fully_masked;
  for (Index i = 0; i < n_q; ++i) {
    if (!keep.row(i).any()) fully_masked.push_back(i);
  }
  REQUIRE(static_cast<Index>(fully_masked.size()) == config.at("fully_masked_rows"));
  const auto compare_output = [&](const Matrix<Scalar>& out) {
    REQUIRE(out.rows() == n_q);
    REQUIRE(out.cols() == module.embed_dim());
    for (Index i = 0; i < n_q; ++i) {
      if (std::find(fully_masked.begin(), fully_masked.end(), i) != fully_masked.end()) {
        CHECK(expected.row(i).array().isNaN().all());
        CHECK(max_abs_difference(out.row(i), module.output_bias()) == 0.0);
      } else {
        CAPTURE(i);
        CHECK(max_abs_difference(out.row(i), expected.row(i)) <= tolerance);
      }
    }
  };

  SECTION("the output, through the tiled kernel") {
    compare_output(module.forward(query, key, value, options));
  }
  if (config.at("need_weights") == 1) {
    SECTION("the output and the attention weights PyTorch returned") {
      const auto which = config.at("average_attn_weights") == 1 ? attn::AttentionWeights::averaged
                                                                 : attn::AttentionWeights::per_head;
      Matrix<Scalar> weights;
      compare_output(module.forward(query, key, value, options, which, weights));
      const Matrix<Scalar> expected_weights = load<Scalar>(directory, output_name<Scalar>("weights"));
      REQUIRE(weights.rows() == expected_weights.rows());
      REQUIRE(weights.cols() == expected_weights.cols());
      const Index heads_in_rows = which == attn::AttentionWeights::per_head ? module.num_heads() : 1;
      const double weight_tolerance = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
      for (Index r = 0; r < weights.rows(); ++r) {
        const Index query_row = r % n_q;
        if (std::find(fully_masked.begin(), fully_masked.end(), query_row) != fully_masked.end()) {
          CHECK(expected_weights.row(r).array().isNaN().all());
          CHECK(weights.row(r).isZero(0));
        } else {
          CAPTURE(r, heads_in_rows);
          CHECK(max_abs_difference(weights.row(r), expected_weights.row(r)) <= weight_tolerance);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("forward_batch matches PyTorch's padded batch, sequence by sequence", "[multi_head][torch][batch]",
                   float, double) {
  using Scalar = TestType;
  const fs::path directory = torch_fixture("batched");
  auto config = read_config(directory);
  const auto module = load_module<Scalar>(directory, config);
  // PyTorch ran the three sequences as one batch padded to the longest, with a key padding
  // mask; attn takes them at their own lengths. make_torch_fixtures.py checks that each
  // sequence alone gives PyTorch the same rows, so the padded run is the reference.
  std::vector<Matrix<Scalar>> sequences;
  for (Index i = 0; i < config.at("batch"); ++i) {
    sequences.push_back(load<Scalar>(directory, "query_" + std::to_string(i)));
    REQUIRE(sequences.back().rows() == config.at("length_" + std::to_string(i)));
  }
  // (Threads: tests/test_threads.cpp, built with OpenMP; this executable runs one.)
  const auto outputs = module.forward_batch(sequences);
  REQUIRE(outputs.size() == sequences.size());
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const Matrix<Scalar> expected = load<Scalar>(directory, output_name<Scalar>("output") + "_" + std::to_string(i));
    CAPTURE(i);
    CHECK(max_abs_difference(outputs[i], expected) <= parity_tolerance<Scalar>(expected));
  }
}

namespace {

/// Rotary embedding written out from RoFormer's definition, in double: pair i of each head
/// (features 2i and 2i+1, or i and i + d/2) turns by position·base^(−2i/d).
Eigen::MatrixXd reference_rope(const Eigen::MatrixXd& x, Index first_position, Index d, attn::Rope rope) {
  Eigen::MatrixXd out = x;
  for (Index r = 0; r < x.rows(); ++r) {
    for (Index head = 0; head < x.cols() / d; ++head) {
      for (Index i = 0; i < d / 2; ++i) {
        const Index a = head * d + (rope.style == attn::RopeStyle::interleaved ? 2 * i : i);
        const Index b = head * d + (rope.style == attn::RopeStyle::interleaved ? 2 * i + 1 : i + d / 2);
        const double angle = double(first_position + r) * std::pow(rope.base, -2.0 * double(i) / double(d));
        out(r, a) = x(r, a) * std::cos(angle) - x(r, b) * std::sin(angle);
        out(r, b) = x(r, a) * std::sin(angle) + x(r, b) * std::cos(angle);
      }
    }
  }
  return out;
}

struct PositionReference {
  std::optional<attn::Rope> rope;
  std::optional<std::vector<double>> alibi;  // one slope per head
};

/// Grouped-query multi-head attention written out with loops in double: project, then for
/// each query head h attend with KV head h / (H / H_kv) (each KV head repeated over its
/// group of query heads), concatenate, project out.
Eigen::MatrixXd reference_multi_head(const Eigen::MatrixXd& query, const Eigen::MatrixXd& key,
                                     const Eigen::MatrixXd& value, Index num_heads, Index num_kv_heads,
                                     const Eigen::MatrixXd& w_q, const Eigen::MatrixXd& w_k, const Eigen::MatrixXd& w_v,
                                     const Eigen::MatrixXd& w_o, const Eigen::RowVectorXd& b_q,
                                     const Eigen::RowVectorXd& b_k, const Eigen::RowVectorXd& b_v,
                                     const Eigen::RowVectorXd& b_o, const attn_test::ReferenceMasks& masks = {},
                                     const PositionReference& positions = {}) {
  Eigen::MatrixXd q = attn_test::reference_project(query, w_q, &b_q);
  Eigen::MatrixXd k = attn_test::reference_project(key, w_k, &b_k);
  const Eigen::MatrixXd v = attn_test::reference_project(value, w_v, &b_v);
  const Index d = q.cols() / num_heads;
  const Index n_q = q.rows();
  const Index n_k = k.rows();
  if (positions.rope) {
    // Queries continue where the keys' positions end (bottom-right, as the causal rule).
    q = reference_rope(q, n_k - n_q, d, *positions.rope);
    k = reference_rope(k, 0, d, *positions.rope);
  }
  Eigen::MatrixXd context(n_q, q.cols());
  for (Index h = 0; h < num_heads; ++h) {
    const Index g = h / (num_heads / num_kv_heads);
    attn_test::ReferenceMasks head_masks = masks;
    if (positions.alibi) {
      // ALiBi's bias for this head: −m_h·|distance|, m_h from the paper's geometric sequence.
      Eigen::MatrixXd bias(n_q, n_k);
      for (Index i = 0; i < n_q; ++i) {
        for (Index j = 0; j < n_k; ++j) bias(i, j) = -(*positions.alibi)[std::size_t(h)] * std::abs(double(i + n_k - n_q - j));
      }
      head_masks.bias = bias;
    }
    context.middleCols(h * d, d) = attn_test::reference_attention(q.middleCols(h * d, d), k.middleCols(g * d, d),
                                                                  v.middleCols(g * d, d), 1.0 / std::sqrt(double(d)),
                                                                  head_masks)
                                       .output;
  }
  return attn_test::reference_project(context, w_o, &b_o);
}

/// A module with random weights and biases, and the same parameters in double for the
/// reference.
template <typename Scalar>
struct RandomModule {
  attn::MultiHeadAttention<Scalar> module;
  Eigen::MatrixXd w_q, w_k, w_v, w_o;
  Eigen::RowVectorXd b_q, b_k, b_v, b_o;

  RandomModule(Index embed_dim, Index num_heads, attn::MultiHeadOptions options, std::uint32_t seed)
      : module(embed_dim, num_heads, options) {
    const Index kv = module.kv_width();
    w_q = random_matrix<double>(embed_dim, embed_dim, seed, 0.5);
    w_k = random_matrix<double>(module.kdim(), kv, seed + 1, 0.5);
    w_v = random_matrix<double>(module.vdim(), kv, seed + 2, 0.5);
    w_o = random_matrix<double>(embed_dim, embed_dim, seed + 3, 0.5);
    b_q = random_matrix<double>(1, embed_dim, seed + 4, 0.5);
    b_k = random_matrix<double>(1, kv, seed + 5, 0.5);
    b_v = random_matrix<double>(1, kv, seed + 6, 0.5);
    b_o = random_matrix<double>(1, embed_dim, seed + 7, 0.5);
    // Round to Scalar once, so the double reference sees exactly the module's parameters.
    for (auto* m : {&w_q, &w_k, &w_v, &w_o}) *m = m->template cast<Scalar>().template cast<double>();
    for (auto* b : {&b_q, &b_k, &b_v, &b_o}) *b = b->template cast<Scalar>().template cast<double>();
    module.set_weights(w_q.cast<Scalar>(), w_k.cast<Scalar>(), w_v.cast<Scalar>(), w_o.cast<Scalar>());
    module.set_biases(b_q.cast<Scalar>(), b_k.cast<Scalar>(), b_v.cast<Scalar>(), b_o.cast<Scalar>());
  }

  Eigen::MatrixXd reference(const Matrix<Scalar>& query, const Matrix<Scalar>& key, const Matrix<Scalar>& value,
                            const attn_test::ReferenceMasks& masks = {}, const PositionReference& positions = {}) const {
    return reference_multi_head(query.template cast<double>(), key.template cast<double>(),
                                value.template cast<double>(), module.num_heads(), module.num_kv_heads(), w_q, w_k, w_v,
                                w_o, b_q, b_k, b_v, b_o, masks, positions);
  }
};

template <typename Scalar>
double loop_tolerance(const Eigen::MatrixXd& reference, Index width, Index n_k) {
  const double magnitude = reference.size() == 0 ? 1.0 : reference.cwiseAbs().maxCoeff();
  return attn_test::tolerance<Scalar>(3 * width, n_k, magnitude);
}

}  // namespace

TEMPLATE_TEST_CASE("grouped-query and multi-query attention match a loop that repeats each KV head",
                   "[multi_head][gqa]", float, double) {
  using Scalar = TestType;
  const auto [num_heads, num_kv_heads] = GENERATE(table<Index, Index>({{8, 8}, {8, 2}, {8, 1}, {6, 3}, {4, 4}}));
  const bool causal = GENERATE(false, true);
  CAPTURE(num_heads, num_kv_heads, causal);
  attn::MultiHeadOptions options;
  options.num_kv_heads = num_kv_heads;
  const Index embed_dim = 8 * num_heads;
  const RandomModule<Scalar> random(embed_dim, num_heads, options, 11);
  REQUIRE(random.module.kv_width() == num_kv_heads * 8);
  const Index n_q = 37;
  const Index n_k = causal ? 37 : 53;  // cross-attention when not causal
  const Matrix<Scalar> query = random_matrix<Scalar>(n_q, embed_dim, 1);
  const Matrix<Scalar> key = causal ? query : random_matrix<Scalar>(n_k, embed_dim, 2);
  const Matrix<Scalar> value = causal ? query : random_matrix<Scalar>(n_k, embed_dim, 3);
  attn::AttentionOptions<Scalar> attention_options;
  attention_options.causal = causal;
  attn_test::ReferenceMasks masks;
  masks.causal = causal;

  const Eigen::MatrixXd expected = random.reference(query, key, value, masks);
  const double tolerance = loop_tolerance<Scalar>(expected, embed_dim, n_k);
  CHECK(max_abs_difference(random.module.forward(query, key, value, attention_options), expected) <= tolerance);
  // The weights path (one head's scores at a time) gives the same output.
  Matrix<Scalar> weights;
  CHECK(max_abs_difference(random.module.forward(query, key, value, attention_options,
                                                 attn::AttentionWeights::per_head, weights),
                           expected) <= tolerance);
  REQUIRE(weights.rows() == num_heads * n_q);
  // Every head's weights are a distribution over the keys.
  const Eigen::VectorXd row_sums = weights.template cast<double>().rowwise().sum();
  CHECK((row_sums.array() - 1.0).abs().maxCoeff() <= 1e3 * double(std::numeric_limits<Scalar>::epsilon()));
  // Heads in a group share keys and values, not queries: their weights differ.
  if (num_kv_heads < num_heads) CHECK(max_abs_difference(weights.topRows(n_q), weights.middleRows(n_q, n_q)) > 1e-3);
}

TEMPLATE_TEST_CASE("RoPE and ALiBi in the module match the loop reference", "[multi_head][rope][alibi]", float,
                   double) {
  using Scalar = TestType;
  const int positions = GENERATE(1, 2, 3);  // RoPE halves, RoPE interleaved, ALiBi
  const bool causal = GENERATE(false, true);
  CAPTURE(positions, causal);
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;
  PositionReference reference_positions;
  if (positions == 3) {
    options.alibi = true;
    // 8 heads, a power of two: the paper's slopes 2^(−8(h+1)/8) = 1/2, 1/4, …, 1/256.
    std::vector<double> slopes;
    for (int h = 0; h < 8; ++h) slopes.push_back(std::pow(2.0, -(h + 1.0)));
    reference_positions.alibi = slopes;
  } else {
    options.rope = attn::Rope{positions == 1 ? 10000.0 : 500.0,
                              positions == 1 ? attn::RopeStyle::halves : attn::RopeStyle::interleaved};
    reference_positions.rope = options.rope;
  }
  const RandomModule<Scalar> random(64, 8, options, 31);
  const Index n_q = causal ? 45 : 17;
  const Index n_k = 45;  // n_q < n_k: positions and the causal rule align bottom-right
  const Matrix<Scalar> memory = random_matrix<Scalar>(n_k, 64, 32);
  const Matrix<Scalar> query = causal ? memory : Matrix<Scalar>(memory.bottomRows(n_q));
  attn::AttentionOptions<Scalar> attention_options;
  attention_options.causal = causal;
  attn_test::ReferenceMasks masks;
  masks.causal = causal;
  const Eigen::MatrixXd expected = random.reference(query, memory, memory, masks, reference_positions);
  const double tolerance = loop_tolerance<Scalar>(expected, 64, n_k);
  CHECK(max_abs_difference(random.module.forward(query, memory, memory, attention_options), expected) <= tolerance);
  Matrix<Scalar> weights;
  CHECK(max_abs_difference(random.module.forward(query, memory, memory, attention_options,
                                                 attn::AttentionWeights::averaged, weights),
                           expected) <= tolerance);
  // Without positions the module is a different function: the test can tell them apart.
  attn::MultiHeadOptions plain = options;
  plain.rope.reset();
  plain.alibi = false;
  const RandomModule<Scalar> unpositioned(64, 8, plain, 31);
  CHECK(max_abs_difference(unpositioned.module.forward(query, memory, memory, attention_options), expected) > 1e-3);
}

TEMPLATE_TEST_CASE("kdim and vdim, without bias, against the loop reference", "[multi_head]", float, double) {
  using Scalar = TestType;
  attn::MultiHeadOptions options;
  options.kdim = 5;
  options.vdim = 9;
  options.num_kv_heads = 2;
  const RandomModule<Scalar> random(12, 4, options, 3);
  const Matrix<Scalar> query = random_matrix<Scalar>(7, 12, 4);
  const Matrix<Scalar> key = random_matrix<Scalar>(10, 5, 5);
  const Matrix<Scalar> value = random_matrix<Scalar>(10, 9, 6);
  const Eigen::MatrixXd expected = random.reference(query, key, value);
  CHECK(max_abs_difference(random.module.forward(query, key, value), expected) <=
        loop_tolerance<Scalar>(expected, 12, 10));

  // bias = false: the same module without biases.
  options.bias = false;
  attn::MultiHeadAttention<Scalar> unbiased(12, 4, options);
  unbiased.set_weights(random.w_q.template cast<Scalar>(), random.w_k.template cast<Scalar>(),
                       random.w_v.template cast<Scalar>(), random.w_o.template cast<Scalar>());
  const Eigen::RowVectorXd zero_q = Eigen::RowVectorXd::Zero(12);
  const Eigen::RowVectorXd zero_kv = Eigen::RowVectorXd::Zero(unbiased.kv_width());
  const Eigen::MatrixXd unbiased_expected =
      reference_multi_head(query.template cast<double>(), key.template cast<double>(), value.template cast<double>(), 4,
                           2, random.w_q, random.w_k, random.w_v, random.w_o, zero_q, zero_kv, zero_kv, zero_q);
  CHECK(max_abs_difference(unbiased.forward(query, key, value), unbiased_expected) <=
        loop_tolerance<Scalar>(unbiased_expected, 12, 10));
  CHECK(unbiased.output_bias().size() == 0);
}

TEST_CASE("forward_batch is forward on each sequence", "[multi_head][batch]") {
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;
  const RandomModule<float> random(32, 4, options, 21);
  std::vector<Matrix<float>> sequences;
  for (Index length : {1, 40, 7, 0, 130, 3}) sequences.push_back(random_matrix<float>(length, 32, std::uint32_t(length)));
  attn::AttentionOptionsf attention_options;
  attention_options.causal = true;
  const auto outputs = random.module.forward_batch(sequences, attention_options);
  REQUIRE(outputs.size() == sequences.size());
  for (std::size_t i = 0; i < sequences.size(); ++i) {
    CAPTURE(i);
    const Matrix<float> alone = random.module.forward(sequences[i], sequences[i], sequences[i], attention_options);
    // The same kernel on the same problem: bitwise.
    CHECK(outputs[i] == alone);
  }
}

namespace {

/// Feeds `sequence` to a decode step `chunk` tokens at a time and returns the stacked
/// outputs.
template <typename Scalar>
Matrix<Scalar> decode_in_steps(const attn::MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& sequence,
                               Index chunk, attn::KVCache<Scalar>& cache, Index layer,
                               const attn::AttentionOptions<Scalar>& options = {}) {
  Matrix<Scalar> outputs(sequence.rows(), module.embed_dim());
  attn::MultiHeadWorkspace<Scalar> workspace;
  Matrix<Scalar> out;
  for (Index first = 0; first < sequence.rows(); first += chunk) {
    const Index count = std::min(chunk, sequence.rows() - first);
    module.decode_into(sequence.middleRows(first, count), cache, layer, options, out, workspace);
    outputs.middleRows(first, count) = out;
  }
  return outputs;
}

}  // namespace

TEMPLATE_TEST_CASE("decoding token by token with a KV cache equals one causal forward", "[multi_head][decode]", float,
                   double) {
  using Scalar = TestType;
  const Index num_kv_heads = GENERATE(4, 2, 1);
  const Index chunk = GENERATE(1, 5);
  const int positions = GENERATE(0, 1, 2);  // none, RoPE, ALiBi
  CAPTURE(num_kv_heads, chunk, positions);
  attn::MultiHeadOptions options;
  options.num_kv_heads = num_kv_heads;
  if (positions == 1) options.rope = attn::Rope{10000.0, attn::RopeStyle::halves};
  options.alibi = positions == 2;
  const RandomModule<Scalar> random(32, 4, options, 5);
  // Long enough for the key split (1024 keys per chunk) to kick in.
  const Index n = chunk == 1 ? 1100 : 61;
  const Matrix<Scalar> sequence = random_matrix<Scalar>(n, 32, 8);
  attn::AttentionOptions<Scalar> causal;
  causal.causal = true;
  const Matrix<Scalar> full = random.module.forward(sequence, sequence, sequence, causal);

  auto cache = random.module.make_cache(2, n);
  // Layer 1 only: layers are independent.
  const Matrix<Scalar> stepped = decode_in_steps(random.module, sequence, chunk, cache, 1);
  CHECK(cache.size(1) == n);
  CHECK(cache.size(0) == 0);
  const double bound = std::is_same_v<Scalar, float> ? 1e-6 : 1e-12;
  CHECK(max_abs_difference(stepped, full) <= bound * std::max(1.0, double(full.cwiseAbs().maxCoeff())));
  // The cache holds the projected keys and values (to rounding: one token's projection is
  // a matrix-vector product, which Eigen sums in another order than a matrix product).
  Eigen::MatrixXd keys = attn_test::reference_project(sequence.template cast<double>(), random.w_k, &random.b_k);
  if (options.rope) keys = reference_rope(keys, 0, random.module.head_dim(), *options.rope);  // stored rotated
  const Eigen::MatrixXd values = attn_test::reference_project(sequence.template cast<double>(), random.w_v, &random.b_v);
  CHECK(max_abs_difference(cache.keys(1), keys) <= attn_test::tolerance<Scalar>(32, 0, keys.cwiseAbs().maxCoeff()));
  CHECK(max_abs_difference(cache.values(1), values) <=
        attn_test::tolerance<Scalar>(32, 0, values.cwiseAbs().maxCoeff()));
}

TEMPLATE_TEST_CASE("decoding with a sliding window equals one causal forward with that window",
                   "[multi_head][decode][window]", float, double) {
  using Scalar = TestType;
  attn::MultiHeadOptions options;
  options.num_kv_heads = 1;
  options.rope = attn::Rope{};
  const RandomModule<Scalar> random(32, 4, options, 17);
  const Matrix<Scalar> sequence = random_matrix<Scalar>(90, 32, 18);
  // Each token sees itself and the 16 before it (Mistral-style local attention).
  attn::AttentionOptions<Scalar> local;
  local.window = attn::SlidingWindow{16, 0};
  attn::AttentionOptions<Scalar> causal_local = local;
  causal_local.causal = true;
  const Matrix<Scalar> full = random.module.forward(sequence, sequence, sequence, causal_local);
  auto cache = random.module.make_cache(1, 90);
  const Matrix<Scalar> stepped = decode_in_steps(random.module, sequence, 1, cache, 0, local);
  const double bound = std::is_same_v<Scalar, float> ? 1e-6 : 1e-12;
  CHECK(max_abs_difference(stepped, full) <= bound * std::max(1.0, double(full.cwiseAbs().maxCoeff())));
  // The window matters: without it the last outputs differ.
  attn::AttentionOptions<Scalar> causal;
  causal.causal = true;
  CHECK(max_abs_difference(random.module.forward(sequence, sequence, sequence, causal).bottomRows(10),
                           full.bottomRows(10)) > 1e-3);
}

TEST_CASE("a KV cache at capacity throws and stays as it was, or grows when asked", "[multi_head][decode]") {
  const RandomModule<double> random(16, 2, {}, 9);
  const Matrix<double> sequence = random_matrix<double>(6, 16, 2);
  attn::AttentionOptionsd causal;
  causal.causal = true;
  const Matrix<double> full = random.module.forward(sequence, sequence, sequence, causal);

  SECTION("throw_error: a clear error, and the cache as it was") {
    auto cache = random.module.make_cache(1, 4);
    decode_in_steps(random.module, Matrix<double>(sequence.topRows(3)), 3, cache, 0);
    const Matrix<double> keys_before = cache.keys(0);
    CHECK_THROWS_MATCHES(random.module.decode(sequence.middleRows(3, 2), cache, 0), attn::capacity_error,
                         attn_test::Message("attn::KVCache: layer 0 holds 3 of 4 tokens and cannot take 2 more "
                                            "(reserve a larger capacity, or construct with CacheOverflow::grow)"));
    CHECK(cache.size(0) == 3);
    CHECK(cache.keys(0) == keys_before);
    // One more still fits; then it is full.
    random.module.decode(sequence.middleRows(3, 1), cache, 0);
    CHECK_THROWS_AS(random.module.decode(sequence.middleRows(4, 1), cache, 0), attn::capacity_error);
    // reserve makes room and keeps the contents: decoding goes on.
    cache.reserve(6);
    const Matrix<double> last = random.module.decode(sequence.bottomRows(2), cache, 0);
    CHECK(max_abs_difference(last, full.bottomRows(2)) <= 1e-12);
  }
  SECTION("grow: reallocates and goes on") {
    auto cache = random.module.make_cache(1, 2, attn::CacheOverflow::grow);
    const Matrix<double> stepped = decode_in_steps(random.module, sequence, 1, cache, 0);
    CHECK(cache.capacity() >= 6);
    CHECK(max_abs_difference(stepped, full) <= 1e-12);
  }
  SECTION("clear and truncate start over or roll back") {
    auto cache = random.module.make_cache(1, 6);
    decode_in_steps(random.module, sequence, 2, cache, 0);
    cache.truncate(2);
    CHECK(cache.size(0) == 2);
    const Matrix<double> again = decode_in_steps(random.module, Matrix<double>(sequence.bottomRows(4)), 1, cache, 0);
    CHECK(max_abs_difference(again, full.bottomRows(4)) <= 1e-12);
    cache.clear();
    CHECK(cache.size(0) == 0);
    CHECK(cache.capacity() == 6);
  }
}

TEST_CASE("KVCache::append copies a view of the cache itself safely when it grows", "[multi_head][decode]") {
  // Duplicating a layer (a shared prefix) passes views of the storage that growing frees.
  attn::KVCached cache(2, 3, 2, 2, attn::CacheOverflow::grow);
  const Matrix<double> keys = random_matrix<double>(2, 3, 1);
  const Matrix<double> values = random_matrix<double>(2, 2, 2);
  cache.append(0, keys, values);
  cache.append(0, cache.keys(0), cache.values(0));  // 2 + 2 tokens in a capacity of 2
  REQUIRE(cache.size(0) == 4);
  CHECK(cache.keys(0).topRows(2) == keys);
  CHECK(cache.keys(0).bottomRows(2) == keys);
  CHECK(cache.values(0).bottomRows(2) == values);
  cache.truncate(0, 1);
  CHECK(cache.size(0) == 1);
  CHECK(cache.size(1) == 0);
}

TEST_CASE("KVCache stores each KV head's tokens as one run, and keeps them when it grows", "[multi_head][decode]") {
  // 3 heads of 2 key and 3 value columns; growing from 2 to 4 and then 8 tokens moves
  // every head's run to its new place.
  attn::KVCached cache(2, 6, 9, 2, attn::CacheOverflow::grow, 3);
  CHECK(cache.num_kv_heads() == 3);
  const Matrix<double> keys = random_matrix<double>(5, 6, 3);
  const Matrix<double> values = random_matrix<double>(5, 9, 4);
  cache.append(1, keys.topRows(2), values.topRows(2));
  cache.append(1, keys.bottomRows(3), values.bottomRows(3));
  REQUIRE(cache.size(1) == 5);
  CHECK(cache.capacity() == 5);
  CHECK(cache.keys(1) == keys);
  CHECK(cache.values(1) == values);
  // Head-major: head h's five keys are one row-major run, where the kernel reads them.
  const auto stored = attn::detail::KVCacheAccess::keys(cache, 1);
  for (Index head = 0; head < 3; ++head) {
    CAPTURE(head);
    CHECK(stored.head_rows(head, 0, 5) == keys.middleCols(2 * head, 2));
    CHECK(stored.head_rows(head, 0, 5).data() + 5 * 2 <= stored.data + stored.head_stride * (head + 1));
  }
  CHECK_THROWS_MATCHES(attn::KVCached(1, 6, 9, 2, attn::CacheOverflow::grow, 4), std::invalid_argument,
                       attn_test::Message("attn::KVCache: num_kv_heads must be positive and divide both widths, got "
                                          "num_kv_heads = 4, key_width = 6, value_width = 9"));
}

TEST_CASE("KVCache::append stores what it is given", "[multi_head][decode]") {
  attn::KVCachef cache(2, 3, 2, 5);
  const Matrix<float> keys = random_matrix<float>(2, 3, 1);
  const Matrix<float> values = random_matrix<float>(2, 2, 2);
  cache.append(1, keys, values);
  CHECK(cache.size(1) == 2);
  CHECK(cache.keys(1) == keys);
  CHECK(cache.values(1) == values);
  CHECK(cache.bytes() == 2 * 5 * (3 + 2) * sizeof(float));
  CHECK_THROWS_MATCHES(cache.append(0, Matrix<float>(1, 4), Matrix<float>(1, 2)), attn::dimension_error,
                       attn_test::Message("attn::KVCache::append: keys is 1x4 but must be count x key_width = 1x3"));
  CHECK_THROWS_MATCHES(cache.append(0, Matrix<float>(1, 3), Matrix<float>(2, 2)), attn::dimension_error,
                       attn_test::Message("attn::KVCache::append: values is 2x2 but must be keys.rows() x value_width "
                                          "= 1x2"));
  CHECK_THROWS_MATCHES(cache.keys(2), std::out_of_range,
                       attn_test::Message("attn::KVCache: layer 2 is out of range [0, 2)"));
  CHECK_THROWS_AS(attn::KVCachef(0, 3, 2, 5), std::invalid_argument);
}

TEST_CASE("KVCache::truncate past the size leaves the cache as it was", "[multi_head][decode]") {
  // A rollback to a length the cache never reached must not expose the storage's
  // uninitialised rows past the size as tokens (capacity 6 leaves room for that mistake).
  attn::KVCached cache(2, 3, 2, 6);
  const Matrix<double> keys = random_matrix<double>(3, 3, 1);
  const Matrix<double> values = random_matrix<double>(3, 2, 2);
  cache.append(0, keys, values);
  cache.append(1, keys.topRows(1), values.topRows(1));
  const auto unchanged = [&] {
    REQUIRE(cache.size(0) == 3);
    REQUIRE(cache.size(1) == 1);
    CHECK(cache.keys(0) == keys);
    CHECK(cache.values(0) == values);
    CHECK(cache.keys(1) == keys.topRows(1));
    CHECK(cache.values(1) == values.topRows(1));
  };
  SECTION("every layer") {
    cache.truncate(3);
    unchanged();
    cache.truncate(5);
    unchanged();
    cache.truncate(100);
    unchanged();
  }
  SECTION("one layer") {
    cache.truncate(1, 2);
    unchanged();
    cache.truncate(0, 4);
    unchanged();
    cache.truncate(1, 6);
    unchanged();
  }
  // Growing storage past the size is no more a way to make tokens.
  cache.reserve(12);
  cache.truncate(1, 10);
  CHECK(cache.size(1) == 1);
  CHECK(cache.keys(1) == keys.topRows(1));
  cache.truncate(2);
  CHECK(cache.size(0) == 2);
  CHECK(cache.keys(0) == keys.topRows(2));
  CHECK(cache.size(1) == 1);
}

TEST_CASE("MultiHeadAttention rejects bad shapes with the numbers", "[multi_head][errors]") {
  using attn_test::Message;
  SECTION("construction") {
    CHECK_THROWS_MATCHES(attn::MultiHeadAttentionf(10, 3), std::invalid_argument,
                         Message("attn::MultiHeadAttention: embed_dim must be divisible by num_heads, got "
                                 "embed_dim = 10, num_heads = 3, num_kv_heads = 0, kdim = 0, vdim = 0"));
    attn::MultiHeadOptions gqa;
    gqa.num_kv_heads = 3;
    ATTN_CHECK_THROWS_CONTAINING(attn::MultiHeadAttentionf(16, 4, gqa), std::invalid_argument,
                         "num_heads must be a multiple of num_kv_heads, got embed_dim = 16, "
                                           "num_heads = 4, num_kv_heads = 3");
    CHECK_THROWS_AS(attn::MultiHeadAttentionf(0, 1), std::invalid_argument);
    CHECK_THROWS_AS(attn::MultiHeadAttentionf(8, -2), std::invalid_argument);
  }
  attn::MultiHeadAttentionf module(8, 2);
  SECTION("load_torch names the tensor and both shapes") {
    const Matrix<float> in_proj = Matrix<float>::Zero(24, 8);
    const Matrix<float> in_bias = Matrix<float>::Zero(24, 1);
    const Matrix<float> out_proj = Matrix<float>::Zero(8, 8);
    const Matrix<float> out_bias = Matrix<float>::Zero(8, 1);
    CHECK_NOTHROW(module.load_torch(in_proj, in_bias, out_proj, out_bias));
    CHECK_THROWS_MATCHES(module.load_torch(Matrix<float>::Zero(8, 24), in_bias, out_proj, out_bias),
                         attn::dimension_error,
                         Message("attn::MultiHeadAttention::load_torch: in_proj_weight is 8x24 but must be "
                                 "(embed_dim + 2*num_kv_heads*head_dim) x embed_dim = 24x8"));
    CHECK_THROWS_MATCHES(module.load_torch(in_proj, Matrix<float>::Zero(23, 1), out_proj, out_bias),
                         attn::dimension_error,
                         Message("attn::MultiHeadAttention::load_torch: in_proj_bias is 23x1 but must be a vector "
                                 "of 24 entries"));
    ATTN_CHECK_THROWS_CONTAINING(module.load_torch(in_proj, in_bias, Matrix<float>::Zero(8, 7), out_bias),
                         attn::dimension_error, "out_proj_weight is 8x7");
    ATTN_CHECK_THROWS_CONTAINING(module.load_torch(in_proj, in_bias, out_proj, Matrix<float>()), attn::dimension_error,
                         "out_proj_bias is 0x0 but must be a vector of 8 entries");
    ATTN_CHECK_THROWS_CONTAINING(module.load_torch(Matrix<float>::Zero(8, 8), Matrix<float>::Zero(8, 8),
                                           Matrix<float>::Zero(8, 7), in_bias, out_proj, out_bias),
                         attn::dimension_error, "v_proj_weight is 8x7 but must be");
    attn::MultiHeadOptions unbiased;
    unbiased.bias = false;
    attn::MultiHeadAttentionf no_bias(8, 2, unbiased);
    ATTN_CHECK_THROWS_CONTAINING(no_bias.load_torch(in_proj, in_bias, out_proj, out_bias), attn::dimension_error,
                         "in_proj_bias is 24x1 but the module was built with bias = false");
    CHECK_THROWS_AS(no_bias.set_biases(in_bias, in_bias, in_bias, in_bias), std::invalid_argument);
    attn::MultiHeadOptions narrow_keys;
    narrow_keys.kdim = 4;
    ATTN_CHECK_THROWS_CONTAINING(attn::MultiHeadAttentionf(8, 2, narrow_keys).load_torch(in_proj, in_bias, out_proj, out_bias),
                         std::invalid_argument, "use the six-argument load_torch");
  }
  SECTION("forward names the input and both shapes") {
    const Matrix<float> x = Matrix<float>::Zero(5, 8);
    CHECK_THROWS_MATCHES(module.forward(Matrix<float>(5, 7), x, x), attn::dimension_error,
                         Message("attn::MultiHeadAttention::forward: query is 5x7 but must be n_q x embed_dim = 5x8"));
    CHECK_THROWS_MATCHES(module.forward(x, x, Matrix<float>(4, 8)), attn::dimension_error,
                         Message("attn::MultiHeadAttention::forward: value is 4x8 but must be key.rows() x vdim = "
                                 "5x8"));
    attn_test::BoolMatrix mask(5, 4);
    attn::AttentionOptionsf options;
    options.mask = mask;
    ATTN_CHECK_THROWS_CONTAINING(module.forward(x, x, x, options), attn::dimension_error, "mask is 5x4");
    std::vector<Matrix<float>> batch{x, x};
    ATTN_CHECK_THROWS_CONTAINING(module.forward_batch(batch, options), std::invalid_argument,
                         "pass per-sequence masks to forward() instead");
    std::vector<Matrix<float>> bad_batch{x, Matrix<float>(2, 3)};
    ATTN_CHECK_THROWS_CONTAINING(module.forward_batch(bad_batch), attn::dimension_error,
                         "forward_batch (sequence 1): query is 2x3");
    // The options are checked before anything else, whatever the batch's size: an empty
    // batch with a negative thread count once reached std::vector's length_error instead.
    attn::AttentionOptionsf negative_threads;
    negative_threads.num_threads = -1;
    CHECK_THROWS_MATCHES(module.forward_batch(std::vector<Matrix<float>>{}, negative_threads), std::invalid_argument,
                         Message("attn::MultiHeadAttention::forward_batch: num_threads must be 0 (all) or positive, "
                                 "got -1"));
    CHECK_THROWS_AS(module.forward_batch(batch, negative_threads), std::invalid_argument);
  }
  SECTION("a decode step checks the cache's shape") {
    attn::KVCachef cache(1, 6, 8, 4);
    ATTN_CHECK_THROWS_CONTAINING(module.decode(Matrix<float>::Zero(1, 8), cache, 0), attn::dimension_error,
                         "cache holds keys of 6 and values of 8 columns but the module's are "
                                           "num_kv_heads*head_dim = 8");
    auto good = module.make_cache(1, 4);
    CHECK_THROWS_AS(module.decode(Matrix<float>::Zero(1, 8), good, 1), std::out_of_range);
    CHECK(good.size(0) == 0);
  }
}
