// The same computations at every instruction set this machine has: tests/CMakeLists.txt
// builds this file once per ISA (x86-64 baseline SSE2, AVX2 + FMA, -march=native), each
// build writes its results as .npy files, and the baseline build compares every other
// build's files with its own. Eigen picks its SIMD code (packet exp, FMA products, vector
// widths) at compile time, so these are different programs computing the same numbers;
// they must agree within the bounds the suite holds each path to against the reference
// (2e-6 of the output's size), though not bitwise. In float only: double's code differs
// by instruction set as well, but each of these programs costs CI about 50 CPU seconds,
// half of them for double; the suite's double tests run at SSE2 (the README command)
// and at -march=native (the sanitizer workflow).
//
//   attn_isa_<isa> write DIR              writes DIR/<case>.npy
//   attn_isa_<isa> compare DIR_A DIR_B    compares two such directories, case by case
//
// The cases reach every kernel a user's build compiles differently: the reference path
// (scores, masks, softmax, weights), the tiled kernel with heads, GQA, every mask, ALiBi and
// the log-sum-exp, a long decode with RoPE across the key split, the 16- and 8-bit
// conversions (bfloat16 operands, bfloat16, half and q8_0 caches), and the worked example.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <type_traits>

#include <attn/attn.hpp>
#include <attn/npy.hpp>

#include "reference.hpp"

namespace {

using Eigen::Index;
using attn_test::random_matrix;
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

template <typename Scalar>
using Results = std::map<std::string, Matrix<Scalar>>;

/// The worked example of the seed document: 3 tokens of 4 features, 4×3 weights.
template <typename Scalar>
void worked_example(Results<Scalar>& results) {
  Matrix<Scalar> x(3, 4), w_q(4, 3), w_k(4, 3), w_v(4, 3);
  x << 1, 0, 1, 0, 0, 2, 0, 2, 1, 1, 1, 1;
  w_q << 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1;
  w_k << 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0;
  w_v << 0, 2, 0, 0, 3, 0, 1, 0, 3, 1, 1, 0;
  const Matrix<Scalar> q = x * w_q, k = x * w_k, v = x * w_v;
  Matrix<Scalar> weights;
  results["worked_example_out"] = attn::attention(q, k, v, {}, weights);
  results["worked_example_weights"] = weights;
}

/// The reference path with every mask, weights included.
template <typename Scalar>
void reference_path(Results<Scalar>& results) {
  const Index n_q = 70, n_k = 90;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, 32, 1, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, 32, 2, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, 16, 3);
  const BoolMatrix keep = attn_test::random_keep_mask(n_q, n_k, 4, 0.8);
  const Matrix<Scalar> bias = random_matrix<Scalar>(n_q, n_k, 5);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.mask = keep;
  options.bias = bias;
  options.window = attn::SlidingWindow{50, -1};
  Matrix<Scalar> out, weights;
  attn::attention_into(q, k, v, options, out, weights);
  results["reference_out"] = out;
  results["reference_weights"] = weights;
  results["softmax_wide_range"] = attn::softmax_rows(random_matrix<Scalar>(40, 300, 6, 60.0));
}

/// The tiled kernel: 8 query heads over 2 KV heads, shapes across tile boundaries, every
/// mask, the log-sum-exp; and ALiBi as a score modifier.
template <typename Scalar>
void tiled_kernel(Results<Scalar>& results) {
  const Index n_q = 200, n_k = 777, d = 64;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, 8 * d, 11, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, 2 * d, 12, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, 2 * d, 13);
  const BoolMatrix keep = attn_test::random_keep_mask(n_q, n_k, 14, 0.8);
  const Matrix<Scalar> bias = random_matrix<Scalar>(n_q, n_k, 15);
  attn::AttentionOptions<Scalar> options;
  options.mask = keep;
  options.bias = bias;
  options.valid_keys = 700;
  options.window = attn::SlidingWindow{600, 20};
  Matrix<Scalar> out, lse;
  attn::Workspace<Scalar> workspace;
  attn::flash_attention_into(q, k, v, attn::Heads{8, 2}, options, out, lse, workspace);
  results["tiled_masked_out"] = out;
  results["tiled_masked_lse"] = lse;

  options = {};
  options.causal = true;
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> slopes = attn::alibi_slopes<Scalar>(8);
  const attn::Mods mods{attn::alibi_score_mod(slopes, n_q, n_k), attn::NoMaskMod{}};
  attn::flash_attention_into(q, k, v, attn::Heads{8, 2}, options, out, lse, workspace, mods);
  results["tiled_alibi_causal_out"] = out;
  results["tiled_alibi_causal_lse"] = lse;
}

/// Decoding: a module with GQA and RoPE, its cache (stored as `Storage`) filled past the
/// key split (1024), then token-by-token steps.
template <typename Scalar, typename Storage = Scalar>
void decode(Results<Scalar>& results, const std::string& prefix = "decode") {
  // A cache in 16 or 8 bits rounds the keys and values it is given, so their projections
  // must be the same bits on every instruction set, or an entry near a rounding boundary
  // rounds apart (and moves the output by 1e-5, past the bound). Weights, biases and
  // tokens on a grid of 1/16 make every projection exact in float; RoPE's sines and
  // cosines would not be, and stay with the float cache.
  constexpr bool rounds_its_rows = !std::is_same_v<Storage, Scalar>;
  const auto matrix = [](Index rows, Index cols, std::uint32_t seed, double range) -> Matrix<Scalar> {
    Matrix<Scalar> m = random_matrix<Scalar>(rows, cols, seed, range);
    if constexpr (rounds_its_rows) m = (m.array() * Scalar(16)).round() / Scalar(16);
    return m;
  };
  const Index embed_dim = 128, prompt = 1020, steps = 24;
  attn::MultiHeadOptions shape;
  shape.num_kv_heads = 2;
  if (!rounds_its_rows) shape.rope = attn::Rope{};
  attn::MultiHeadAttention<Scalar> module(embed_dim, 8, shape);
  const Index kv = module.kv_width();
  module.set_weights(matrix(embed_dim, embed_dim, 21, 0.2), matrix(embed_dim, kv, 22, 0.2),
                     matrix(embed_dim, kv, 23, 0.2), matrix(embed_dim, embed_dim, 24, 0.2));
  module.set_biases(matrix(1, embed_dim, 25, 0.1), matrix(1, kv, 26, 0.1), matrix(1, kv, 27, 0.1),
                    matrix(1, embed_dim, 28, 0.1));
  const Matrix<Scalar> tokens = matrix(prompt + steps, embed_dim, 29, 1.0);
  auto cache = module.template make_cache<Storage>(1, prompt + steps);
  attn::MultiHeadWorkspace<Scalar> workspace;
  Matrix<Scalar> out, step_outputs(steps, embed_dim);
  module.decode_into(tokens.topRows(prompt), cache, 0, {}, out, workspace);
  results[prefix + "_prompt_out"] = out;
  for (Index t = 0; t < steps; ++t) {
    module.decode_into(tokens.middleRows(prompt + t, 1), cache, 0, {}, out, workspace);
    step_outputs.row(t) = out;
  }
  results[prefix + "_steps_out"] = step_outputs;
}

/// 16- and 8-bit storage, computed in float: the tiled kernel over bfloat16 queries, keys
/// and values (converted as each tile is packed), and decoding over a bfloat16, a half and
/// a q8_0 cache (converted in registers by the row products). The conversions are exact,
/// and the stored values the same bits everywhere (see `decode`), so only the order of the
/// float arithmetic may differ from one instruction set to another.
void reduced_storage(Results<float>& results) {
  const Index n_q = 150, n_k = 300, d = 64;
  using Bf16Matrix = Matrix<attn::bfloat16>;
  const Bf16Matrix q = random_matrix<float>(n_q, 4 * d, 31, 2.0).cast<attn::bfloat16>();
  const Bf16Matrix k = random_matrix<float>(n_k, 2 * d, 32, 2.0).cast<attn::bfloat16>();
  const Bf16Matrix v = random_matrix<float>(n_k, 2 * d, 33).cast<attn::bfloat16>();
  attn::AttentionOptionsf options;
  options.causal = true;
  Matrix<float> out, lse;
  attn::Workspacef workspace;
  attn::flash_attention_into(q, k, v, attn::Heads{4, 2}, options, out, lse, workspace);
  results["bf16_tiled_causal_out"] = out;
  results["bf16_tiled_causal_lse"] = lse;
  decode<float, attn::bfloat16>(results, "decode_bf16_cache");
  decode<float, attn::half>(results, "decode_half_cache");
  decode<float, attn::q8_0>(results, "decode_q8_0_cache");
}

template <typename Scalar>
Results<Scalar> compute() {
  Results<Scalar> results;
  worked_example(results);
  reference_path(results);
  tiled_kernel(results);
  decode(results);
  if constexpr (std::is_same_v<Scalar, float>) reduced_storage(results);
  return results;
}

template <typename Scalar>
const char* scalar_name() {
  return std::is_same_v<Scalar, float> ? "float" : "double";
}

template <typename Scalar>
void write(const std::filesystem::path& directory) {
  for (const auto& [name, matrix] : compute<Scalar>()) {
    attn::npy::save(directory / (name + "_" + scalar_name<Scalar>() + ".npy"), matrix);
  }
}

/// Compares every case of two directories; returns the number of cases out of bounds.
template <typename Scalar>
int compare(const std::filesystem::path& first, const std::filesystem::path& second) {
  const double relative = std::is_same_v<Scalar, float> ? 2e-6 : 1e-12;
  int failures = 0;
  for (const auto& [name, ignored] : compute<Scalar>()) {
    const std::string file = name + "_" + scalar_name<Scalar>() + ".npy";
    const Matrix<Scalar> a = attn::npy::load<Scalar>(first / file);
    const Matrix<Scalar> b = attn::npy::load<Scalar>(second / file);
    double difference = std::numeric_limits<double>::infinity();
    double size = 1.0;
    if (a.rows() == b.rows() && a.cols() == b.cols()) {
      const Eigen::MatrixXd ad = a.template cast<double>(), bd = b.template cast<double>();
      // An entry that is −∞ in both (a fully masked row's log-sum-exp) agrees.
      const Eigen::MatrixXd gap = (ad.array() == bd.array()).select(0.0, (ad - bd).cwiseAbs());
      difference = gap.allFinite() ? (gap.size() == 0 ? 0.0 : gap.maxCoeff()) : difference;
      size = std::max(1.0, ad.array().isFinite().select(ad.cwiseAbs(), 0.0).maxCoeff());
    }
    const bool within = difference <= relative * size;
    failures += within ? 0 : 1;
    std::printf("%-32s %-6s %s: max difference %.3g of size %.3g (bound %.3g)%s\n", name.c_str(),
                scalar_name<Scalar>(), within ? "agrees" : "DISAGREES", difference, size, relative * size,
                difference == 0.0 ? ", bitwise equal" : "");
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "write" && argc == 3) {
      std::filesystem::create_directories(argv[2]);
      write<float>(argv[2]);
      return 0;
    }
    if (mode == "compare" && argc == 4) {
      std::printf("%s against %s\n", argv[2], argv[3]);
      const int failures = compare<float>(argv[2], argv[3]);
      return failures == 0 ? 0 : 1;
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
  std::fprintf(stderr, "usage: %s write DIR | compare DIR_A DIR_B\n", argv[0]);
  return 2;
}
