// 16-bit storage (precision.hpp): the tiled kernel over bfloat16 and half operands, alone
// or mixed with float, computes in float. Its error against the double reference on the
// unrounded inputs is held to FlashAttention's test rule: at most twice the error that
// rounding the inputs to the same storage causes by itself (the double reference on the
// rounded inputs), plus 1e-5; and to absolute bounds of the output's largest entry
// (bfloat16 1e-2, half 2e-3). A KV cache in 16 bits decodes within the same bounds of the
// float cache, in half the bytes.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::Matrix;
using attn_test::max_abs_difference;
using attn_test::random_matrix;
using Eigen::Index;

namespace {

template <typename Storage>
struct StorageBound;
template <>
struct StorageBound<attn::bfloat16> {
  static constexpr double relative = 1e-2;
  static constexpr const char* name = "bfloat16";
};
template <>
struct StorageBound<attn::half> {
  static constexpr double relative = 2e-3;
  static constexpr const char* name = "half";
};

// Unit variance: uniform on [-√3, √3].
Eigen::MatrixXd unit_variance(Index rows, Index cols, std::uint32_t seed) {
  return random_matrix<double>(rows, cols, seed, std::sqrt(3.0));
}

// What storing `x` as `Storage` keeps, back in double.
template <typename Storage>
Eigen::MatrixXd rounded(const Eigen::MatrixXd& x) {
  return x.cast<Storage>().template cast<double>();
}

enum class Masks { none, causal, keep, bias, valid_keys, window };

const char* mask_name(Masks masks) {
  switch (masks) {
    case Masks::none: return "none";
    case Masks::causal: return "causal";
    case Masks::keep: return "keep-mask";
    case Masks::bias: return "bias";
    case Masks::valid_keys: return "valid_keys";
    case Masks::window: return "window";
  }
  return "?";
}

// The same masks for attn's options and the loop reference; the keep-mask leaves row 0
// fully masked, so that every case has an empty row where one is possible.
struct MaskSetup {
  attn::AttentionOptionsf options;
  attn_test::ReferenceMasks reference;
  attn_test::BoolMatrix keep;
  Eigen::MatrixXf bias;

  MaskSetup(Masks masks, Index n_q, Index n_k, std::uint32_t seed) {
    switch (masks) {
      case Masks::none: break;
      case Masks::causal:
        options.causal = true;
        reference.causal = true;
        break;
      case Masks::keep:
        keep = attn_test::random_keep_mask(n_q, n_k, seed, 0.7);
        keep.row(0).setConstant(false);
        options.mask = keep;
        reference.keep = keep;
        break;
      case Masks::bias:
        bias = random_matrix<float>(n_q, n_k, seed, 2.0);
        options.bias = bias;
        reference.bias = bias.cast<double>();
        break;
      case Masks::valid_keys:
        options.valid_keys = n_k / 3 + 1;
        reference.valid_keys = n_k / 3 + 1;
        break;
      case Masks::window:
        options.window = attn::SlidingWindow{n_k / 5, 3};
        reference.window = std::make_pair(n_k / 5, Index(3));
        break;
    }
  }
};

// Heads side by side: head h of q against kv head h / group of k and v, in double.
Eigen::MatrixXd reference_heads(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v,
                                attn::Heads heads, const attn_test::ReferenceMasks& masks) {
  const Index d_k = q.cols() / heads.num_heads;
  const Index d_v = v.cols() / heads.num_kv_heads;
  const Index group = heads.num_heads / heads.num_kv_heads;
  Eigen::MatrixXd out(q.rows(), heads.num_heads * d_v);
  for (Index h = 0; h < heads.num_heads; ++h) {
    const Index kv = h / group;
    out.middleCols(h * d_v, d_v) =
        attn_test::reference_attention(q.middleCols(h * d_k, d_k), k.middleCols(kv * d_k, d_k),
                                       v.middleCols(kv * d_v, d_v), 1.0 / std::sqrt(double(d_k)), masks)
            .output;
  }
  return out;
}

template <typename StorageQ, typename StorageK, typename StorageV>
void check_against_rounding(Index n_q, Index n_k, Index d, attn::Heads heads, Masks masks, std::uint32_t seed,
                            double relative_bound) {
  const Eigen::MatrixXd q = unit_variance(n_q, heads.num_heads * d, seed);
  const Eigen::MatrixXd k = unit_variance(n_k, heads.num_kv_heads * d, seed + 1);
  const Eigen::MatrixXd v = unit_variance(n_k, heads.num_kv_heads * d, seed + 2);
  const MaskSetup setup(masks, n_q, n_k, seed + 3);

  const Eigen::MatrixXd exact = reference_heads(q, k, v, heads, setup.reference);
  const Eigen::MatrixXd of_rounded = reference_heads(rounded<StorageQ>(q), rounded<StorageK>(k),
                                                     rounded<StorageV>(v), heads, setup.reference);
  const Matrix<StorageQ> q_stored = q.cast<StorageQ>();
  const Matrix<StorageK> k_stored = k.cast<StorageK>();
  const Matrix<StorageV> v_stored = v.cast<StorageV>();
  const Eigen::MatrixXf out = attn::flash_attention(q_stored, k_stored, v_stored, heads, setup.options);

  const double rounding_error = max_abs_difference(of_rounded, exact);
  const double error = max_abs_difference(out, exact);
  const double largest = exact.cwiseAbs().maxCoeff();
  INFO("n_q = " << n_q << ", n_k = " << n_k << ", d = " << d << ", heads " << heads.num_heads << "/"
                << heads.num_kv_heads << ", masks: " << mask_name(masks) << "; error " << error
                << ", rounding alone " << rounding_error << ", largest output " << largest);
  CHECK(error <= 2 * rounding_error + 1e-5);
  CHECK(error <= relative_bound * largest);
}

}  // namespace

TEMPLATE_TEST_CASE("16-bit operands: error within twice the rounding's own, every mask", "[precision]",
                   attn::bfloat16, attn::half) {
  constexpr double bound = StorageBound<TestType>::relative;
  std::uint32_t seed = 700;
  for (const Masks masks : {Masks::none, Masks::causal, Masks::keep, Masks::bias, Masks::valid_keys, Masks::window}) {
    check_against_rounding<TestType, TestType, TestType>(150, 150, 64, attn::Heads{2, 1}, masks, seed += 10, bound);
    check_against_rounding<TestType, TestType, TestType>(40, 700, 128, attn::Heads{}, masks, seed += 10, bound);
  }
}

TEMPLATE_TEST_CASE("16-bit operands over long sequences: N = 4096, d = 64 and 128", "[precision]", attn::bfloat16,
                   attn::half) {
  constexpr double bound = StorageBound<TestType>::relative;
  // Few queries over 4096 keys: the sums that grow with N (the softmax's and the weighted
  // sum's) at their full length, without a 4096² double loop in the suite.
  check_against_rounding<TestType, TestType, TestType>(16, 4096, 64, attn::Heads{}, Masks::none, 800, bound);
  check_against_rounding<TestType, TestType, TestType>(16, 4096, 128, attn::Heads{}, Masks::causal, 810, bound);
}

TEST_CASE("storage types mix: float queries over a 16-bit cache, and three kinds at once", "[precision]") {
  check_against_rounding<float, attn::bfloat16, attn::bfloat16>(33, 600, 64, attn::Heads{4, 2}, Masks::causal, 900,
                                                               StorageBound<attn::bfloat16>::relative);
  check_against_rounding<float, attn::half, attn::half>(33, 600, 64, attn::Heads{4, 2}, Masks::window, 910,
                                                       StorageBound<attn::half>::relative);
  check_against_rounding<attn::bfloat16, attn::half, float>(70, 300, 64, attn::Heads{3, 1}, Masks::keep, 920,
                                                           StorageBound<attn::bfloat16>::relative);
}

TEST_CASE("16-bit operands compute as float on the same values", "[precision]") {
  // The kernel converts tiles exactly (every 16-bit value is a float) and runs the float
  // kernel's arithmetic: the result is the float kernel's on the converted inputs, to the
  // suite's float agreement.
  const Matrix<attn::bfloat16> q = unit_variance(90, 128, 1000).cast<attn::bfloat16>();
  const Matrix<attn::half> k = unit_variance(1500, 64, 1001).cast<attn::half>();
  const attn_test::RowMajorMatrix<attn::bfloat16> v = unit_variance(1500, 64, 1002).cast<attn::bfloat16>();
  attn::AttentionOptionsf options;
  options.causal = true;
  const attn::Heads heads{2, 1};
  const Eigen::MatrixXf as_float = attn::flash_attention(q.cast<float>(), k.cast<float>(), v.cast<float>(), heads, options);
  Eigen::MatrixXf out;
  Eigen::MatrixXf lse;
  attn::Workspacef workspace;
  attn::flash_attention_into(q, k, v, heads, options, out, lse, workspace);
  CHECK(max_abs_difference(out, as_float) <= 2e-6 * as_float.cwiseAbs().maxCoeff());

  SECTION("a 16-bit output is the float output rounded once") {
    Matrix<attn::bfloat16> out_bf16;
    Eigen::MatrixXf lse_again;
    attn::flash_attention_into(q, k, v, heads, options, out_bf16, lse_again, workspace);
    CHECK(out_bf16.cast<float>() == out.cast<attn::bfloat16>().cast<float>());
    CHECK(lse_again == lse);
    Matrix<attn::half> out_half(q.rows(), 128);
    attn::flash_attention_into(q, k, v, heads, options, out_half, workspace);
    CHECK(out_half.cast<float>() == out.cast<attn::half>().cast<float>());
  }
}

TEMPLATE_TEST_CASE("decoding over a 16-bit KV cache stays within the bound of the float cache", "[precision][decode]",
                   attn::bfloat16, attn::half) {
  const Index embed_dim = 128;
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;  // GQA: 8 query heads over 2 kv heads
  options.rope = attn::Rope{};
  attn::MultiHeadAttentionf module(embed_dim, 8, options);
  // Weights of variance 1/E, so that projections of unit-variance tokens have unit variance.
  const float weight_range = float(std::sqrt(3.0 / embed_dim));
  module.set_weights(random_matrix<float>(embed_dim, embed_dim, 1110, weight_range),
                     random_matrix<float>(embed_dim, module.kv_width(), 1111, weight_range),
                     random_matrix<float>(embed_dim, module.kv_width(), 1112, weight_range),
                     random_matrix<float>(embed_dim, embed_dim, 1113, weight_range));
  auto cache = module.make_cache<TestType>(1, 64);
  auto float_cache = module.make_cache(1, 64);
  CHECK(cache.bytes() * 2 == float_cache.bytes());

  const Eigen::MatrixXf tokens = unit_variance(64, embed_dim, 1101).cast<float>();
  attn::MultiHeadWorkspace<float> workspace;
  Eigen::MatrixXf out;
  Eigen::MatrixXf float_out;
  double worst = 0;
  for (Index step = 0; step < tokens.rows(); ++step) {
    module.decode_into(tokens.row(step), cache, 0, {}, out, workspace);
    module.decode_into(tokens.row(step), float_cache, 0, {}, float_out, workspace);
    worst = std::max(worst, max_abs_difference(out, float_out) / float_out.cwiseAbs().maxCoeff());
  }
  INFO(StorageBound<TestType>::name << ": worst step's error relative to its largest output " << worst);
  CHECK(worst <= StorageBound<TestType>::relative);
  CHECK(cache.size(0) == 64);
  // The cache holds the projections rounded once.
  CHECK(cache.keys(0).template cast<float>() ==
        float_cache.keys(0).template cast<TestType>().template cast<float>());
}

TEMPLATE_TEST_CASE("the vectorised widening to float is the type's own conversion, for every 16-bit value",
                   "[precision][widen]", attn::bfloat16, attn::half) {
  std::vector<TestType> values(65536);
  for (std::size_t bits = 0; bits < values.size(); ++bits) {
    values[bits] = Eigen::numext::bit_cast<TestType>(static_cast<std::uint16_t>(bits));
  }
  std::vector<float> widened(values.size()), reference(values.size());
  // From an odd offset, over an odd count: the SIMD body's edges and the scalar tail.
  const Index offset = GENERATE(0, 3);
  const Index count = static_cast<Index>(values.size()) - 2 * offset;
  attn::detail::widen(values.data() + offset, widened.data() + offset, count);
  attn::detail::widen_reference(values.data() + offset, reference.data() + offset, count);
  Index mismatches = 0;
  for (Index i = offset; i < offset + count; ++i) {
    const auto w = static_cast<std::size_t>(i);
    const bool same = std::isnan(reference[w]) ? bool(std::isnan(widened[w]))
                                               : Eigen::numext::bit_cast<std::uint32_t>(widened[w]) ==
                                                     Eigen::numext::bit_cast<std::uint32_t>(reference[w]);
    if (!same) ++mismatches;
  }
  CHECK(mismatches == 0);
  // And the type's own conversion is the IEEE value: 1, the largest finite value, the
  // smallest subnormal.
  if constexpr (std::is_same_v<TestType, attn::half>) {
    CHECK(static_cast<float>(values[0x3c00]) == 1.0f);
    CHECK(static_cast<float>(values[0x7bff]) == 65504.0f);
    CHECK(static_cast<float>(values[0x0001]) == std::ldexp(1.0f, -24));
  } else {
    CHECK(static_cast<float>(values[0x3f80]) == 1.0f);
    CHECK(static_cast<float>(values[0x7f7f]) == std::ldexp(255.0f / 128.0f, 127));
    CHECK(static_cast<float>(values[0x0001]) == std::ldexp(1.0f, -133));
  }
}
