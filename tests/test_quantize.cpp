// 8-bit KV caches (quantize.hpp): q8_0's rounding against a double loop, non-finite and
// out-of-range blocks, the kernel reading a q8_0 cache (in registers for a decode step, a
// tile at a time into scratch for many queries) as the float kernel reads the dequantised
// values, and decoding over a q8_0 cache within the bound (2e-2 of the largest
// output) of the float cache and of a double reference, in 0.27 of the bytes.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::max_abs_difference;
using attn_test::random_matrix;
using Eigen::Index;

namespace {

struct Quantized {
  std::vector<std::int8_t> quants;
  std::vector<Eigen::half> scales;
  std::vector<float> values;  // dequantised
};

Quantized quantize(const Eigen::RowVectorXf& row) {
  const Index width = row.size();
  Quantized q{std::vector<std::int8_t>(static_cast<std::size_t>(width)),
              std::vector<Eigen::half>(static_cast<std::size_t>(attn::q8_0::blocks(width))),
              std::vector<float>(static_cast<std::size_t>(width))};
  attn::quantize_q8_0(row, q.quants.data(), q.scales.data());
  attn::dequantize_q8_0(q.quants.data(), q.scales.data(), width, q.values.data());
  return q;
}

}  // namespace

TEST_CASE("q8_0 rounds each block of 32 to its largest magnitude over 127, to nearest", "[quantize]") {
  const Index width = GENERATE(1, 31, 32, 33, 64, 100);
  CAPTURE(width);
  // Blocks of very different sizes: each gets its own scale.
  Eigen::RowVectorXf row = random_matrix<float>(1, width, 901, 3.0);
  for (Index i = 32; i < width; ++i) row(i) *= 1e-3f;
  const Quantized q = quantize(row);
  CHECK(attn::q8_0::blocks(width) == (width + 31) / 32);
  for (Index block = 0; block * 32 < width; ++block) {
    const Index first = block * 32, count = std::min<Index>(32, width - first);
    double largest = 0;
    for (Index i = first; i < first + count; ++i) largest = std::max(largest, std::abs(double(row(i))));
    const double scale = double(q.scales[std::size_t(block)]);
    // The scale is the largest magnitude over 127, rounded to half.
    CHECK(scale == double(Eigen::half(float(largest / 127.0))));
    for (Index i = first; i < first + count; ++i) {
      const auto at = static_cast<std::size_t>(i);
      INFO("value " << i << " = " << row(i) << ", scale " << scale << ", q " << int(q.quants[at]));
      CHECK(std::abs(int(q.quants[at])) <= 127);
      // Rounded to the nearest multiple of the scale (to float's rounding of the quotient).
      CHECK(std::abs(double(q.quants[at]) - double(row(i)) / scale) <= 0.5 + 1e-5);
      CHECK(double(q.values[at]) == scale * double(q.quants[at]));
      CHECK(std::abs(double(q.values[at]) - double(row(i))) <= 0.5 * scale * (1 + 1e-5));
    }
  }
}

TEST_CASE("q8_0 blocks that cannot hold their values read back as NaN, never as finite numbers", "[quantize]") {
  Eigen::RowVectorXf row = random_matrix<float>(1, 96, 902);
  row(5) = std::numeric_limits<float>::quiet_NaN();                // block 0
  row(40) = std::numeric_limits<float>::infinity();                // block 1
  row.segment(64, 32).setZero();                                   // block 2: all zeros
  const Quantized q = quantize(row);
  for (Index i = 0; i < 64; ++i) CHECK(std::isnan(q.values[std::size_t(i)]));
  for (Index i = 64; i < 96; ++i) CHECK(q.values[std::size_t(i)] == 0.0f);
  // Past what a half scale holds (127 · 65504): NaN too, not infinity times a quant.
  Eigen::RowVectorXf huge = Eigen::RowVectorXf::Constant(32, 1.0f);
  huge(3) = 1e7f;
  const Quantized q_huge = quantize(huge);
  for (const float value : q_huge.values) CHECK(std::isnan(value));
  // Just inside the range, the block stays finite and close.
  huge(3) = 8e6f;
  const Quantized q_large = quantize(huge);
  CHECK(std::abs(q_large.values[3] - 8e6f) <= 0.5f * float(q_large.scales[0]));
}

namespace {

// GQA (8 query heads over 2 KV heads) with RoPE, weights of variance 1/E (so that
// projections of unit-variance tokens have unit variance), in `Scalar`: the same weights
// for the float module and its double reference.
template <typename Scalar>
attn::MultiHeadAttention<Scalar> random_gqa_module(Index embed_dim, std::uint32_t seed) {
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;
  options.rope = attn::Rope{};
  attn::MultiHeadAttention<Scalar> module(embed_dim, 8, options);
  const float range = float(std::sqrt(3.0 / double(embed_dim)));
  const Index kv_width = module.kv_width();
  module.set_weights(random_matrix<float>(embed_dim, embed_dim, seed, range).template cast<Scalar>(),
                     random_matrix<float>(embed_dim, kv_width, seed + 1, range).template cast<Scalar>(),
                     random_matrix<float>(embed_dim, kv_width, seed + 2, range).template cast<Scalar>(),
                     random_matrix<float>(embed_dim, embed_dim, seed + 3, range).template cast<Scalar>());
  return module;
}

}  // namespace

TEST_CASE("the kernel reads a q8_0 cache as the float kernel reads its dequantised values", "[quantize][flash]") {
  // A cache of 3 KV heads of width 40 (a short last block), 1101 tokens (past a split chunk, and a
  // last group of keys that is not a multiple of four).
  const Index tokens = 1101, heads = 3, width = 40;
  attn::KVCache<attn::q8_0> cache(1, heads * width, heads * width, tokens, attn::CacheOverflow::throw_error, heads);
  const Eigen::MatrixXf keys = random_matrix<float>(tokens, heads * width, 911, 2.0);
  const Eigen::MatrixXf values = random_matrix<float>(tokens, heads * width, 912);
  cache.append(0, keys, values);
  const Eigen::MatrixXf dequantised_keys = cache.keys(0);
  const Eigen::MatrixXf dequantised_values = cache.values(0);
  CHECK(max_abs_difference(dequantised_keys, keys) <= 2.0 / 254 * 1.01);

  // 1 query per head (a decode step: the row products) and 20 (the tile products).
  const Index n_q = GENERATE(1, 20);
  CAPTURE(n_q);
  const attn::Heads grouped{6, heads};
  const Eigen::MatrixXf q = random_matrix<float>(n_q, 6 * width, 913, 2.0);
  attn::AttentionOptionsf options;
  options.causal = true;
  attn::Workspacef workspace;
  Eigen::MatrixXf from_cache(n_q, 6 * width);
  attn::detail::flash_attention_unchecked(q, attn::detail::KVCacheAccess::keys(cache, 0),
                                          attn::detail::KVCacheAccess::values(cache, 0), grouped, options,
                                          attn::Mods<>{}, from_cache, workspace);
  const Eigen::MatrixXf expected = attn::flash_attention(q, dequantised_keys, dequantised_values, grouped, options);
  CHECK(max_abs_difference(from_cache, expected) <= 2e-6 * expected.cwiseAbs().maxCoeff());
}

TEST_CASE("decoding over a q8_0 cache stays within 2e-2 of the float cache and of the exact result, in 0.27 of "
          "the bytes",
          "[quantize][decode]") {
  const Index embed_dim = 128;
  const auto module = random_gqa_module<float>(embed_dim, 1210);
  const auto exact_module = random_gqa_module<double>(embed_dim, 1210);
  auto cache = module.make_cache<attn::q8_0>(1, 64);
  auto float_cache = module.make_cache(1, 64);
  auto exact_cache = exact_module.make_cache(1, 64);
  // head_dim 16: 16 quants and one 2-byte scale per row of 16 floats.
  CHECK(double(cache.bytes()) / double(float_cache.bytes()) == Approx(18.0 / 64.0));

  const Eigen::MatrixXd tokens = random_matrix<double>(64, embed_dim, 1201, std::sqrt(3.0));
  attn::MultiHeadWorkspace<float> workspace;
  attn::MultiHeadWorkspace<double> exact_workspace;
  Eigen::MatrixXf out, float_out;
  Eigen::MatrixXd exact;
  double worst = 0, worst_exact = 0;
  for (Index step = 0; step < tokens.rows(); ++step) {
    const Eigen::RowVectorXf token = tokens.row(step).cast<float>();
    module.decode_into(token, cache, 0, {}, out, workspace);
    module.decode_into(token, float_cache, 0, {}, float_out, workspace);
    exact_module.decode_into(token.cast<double>(), exact_cache, 0, {}, exact, exact_workspace);
    worst = std::max(worst, max_abs_difference(out, float_out) / float_out.cwiseAbs().maxCoeff());
    worst_exact = std::max(worst_exact, max_abs_difference(out, exact) / exact.cwiseAbs().maxCoeff());
  }
  INFO("worst step's error relative to its largest output: " << worst << " of the float cache, " << worst_exact
                                                               << " of the double module");
  CHECK(worst <= 2e-2);
  CHECK(worst_exact <= 2e-2);
  CHECK(worst > 1e-5);  // it did store 8 bits
}

TEST_CASE("a q8_0 cache grows, truncates and rejects head-by-head writes like any cache", "[quantize][decode]") {
  attn::KVCache<attn::q8_0> cache(2, 64, 64, 2, attn::CacheOverflow::grow, 2);
  const Eigen::MatrixXf keys = random_matrix<float>(5, 64, 921);
  const Eigen::MatrixXf values = random_matrix<float>(5, 64, 922);
  cache.append(1, keys.topRows(2), values.topRows(2));
  cache.append(1, keys.bottomRows(3), values.bottomRows(3));  // grows past 2
  CHECK(cache.capacity() >= 5);
  CHECK(cache.size(1) == 5);
  CHECK(cache.size(0) == 0);
  const Eigen::MatrixXf stored = cache.keys(1);
  CHECK(max_abs_difference(stored, keys) <= 1.0 / 254 * 1.01);
  // The rows kept across the growth are the ones written before it, bit for bit.
  attn::KVCache<attn::q8_0> first_two(1, 64, 64, 2, attn::CacheOverflow::throw_error, 2);
  first_two.append(0, keys.topRows(2), values.topRows(2));
  CHECK(Eigen::MatrixXf(cache.values(1).topRows(2)) == Eigen::MatrixXf(first_two.values(0)));
  cache.truncate(3);
  CHECK(cache.size(1) == 3);
  CHECK_THROWS_AS(first_two.append(0, keys.topRows(1), values.topRows(1)), attn::capacity_error);
}
