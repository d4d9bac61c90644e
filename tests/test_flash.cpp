// The tiled kernel (flash.hpp) against the reference path and the loop reference: every
// mask, several heads, grouped-query attention, log-sum-exp and merging, tile skipping,
// the key split for decoding, and the score and mask modifiers.

#include <cmath>
#include <limits>
#include <vector>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::MaskKind;
using attn_test::max_abs_difference;
using attn_test::random_keep_mask;
using attn_test::random_matrix;
using Eigen::Index;

using attn_test::Matrix;
using attn_test::BoolMatrix;

namespace {

// The bound for agreement with the reference path: 2e-6 of the output's size in
// float, 1e-12 in double. The two paths round differently (the kernel scales q before the
// product and sums each tile's keys apart), so they agree to rounding, not bitwise.
template <typename Scalar>
double agreement(const Matrix<Scalar>& reference) {
  const double relative = std::is_same_v<Scalar, float> ? 2e-6 : 1e-12;
  const double size = reference.size() == 0 ? 1.0 : std::max(1.0, double(reference.cwiseAbs().maxCoeff()));
  return relative * size;
}

// Sets `options` for `kind`; the keep-mask and bias live in `storage`, which outlives them.
template <typename Scalar>
void set_masks(MaskKind kind, Index n_q, Index n_k, std::uint32_t seed, attn::AttentionOptions<Scalar>& options,
               BoolMatrix& keep, Matrix<Scalar>& bias) {
  const bool all = kind == MaskKind::all;
  if (kind == MaskKind::causal || all) options.causal = true;
  keep = random_keep_mask(n_q, n_k, seed, 0.75);
  if (kind == MaskKind::keep_mask || all) options.mask = keep;
  bias = random_matrix<Scalar>(n_q, n_k, seed + 1, 1.5);
  for (Index r = 0; r < n_q && n_k > 0; r += 3) bias(r, (r * 5) % n_k) = -std::numeric_limits<Scalar>::infinity();
  if (kind == MaskKind::bias || all) options.bias = bias;
  if (kind == MaskKind::valid_keys || all) options.valid_keys = (n_k * 3) / 4;
  if (kind == MaskKind::window || all) options.window = attn::SlidingWindow{40, 7};
}

}  // namespace

TEMPLATE_TEST_CASE("flash_attention agrees with the reference path for every mask", "[flash][property]", float,
                   double) {
  using Scalar = TestType;
  // n_q and n_k from 0 to ~300, mostly not multiples of any tile; d_v ≠ d_k.
  const auto [n_q, n_k, d_k, d_v] = GENERATE(table<Index, Index, Index, Index>(
      {{0, 5, 4, 3}, {4, 0, 4, 3}, {1, 1, 1, 1}, {5, 9, 4, 6}, {37, 300, 16, 8}, {300, 37, 8, 16}, {129, 257, 64, 32},
       {290, 301, 32, 32}}));
  const MaskKind kind = GENERATE(MaskKind::none, MaskKind::causal, MaskKind::keep_mask, MaskKind::bias,
                                 MaskKind::valid_keys, MaskKind::window, MaskKind::all);
  INFO("n_q=" << n_q << " n_k=" << n_k << " d_k=" << d_k << " d_v=" << d_v << " mask=" << name(kind));
  const auto seed = static_cast<std::uint32_t>(n_q * 1009 + n_k * 31 + d_k * 7 + d_v);
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d_k, seed, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d_k, seed + 1, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d_v, seed + 2, 3.0);
  attn::AttentionOptions<Scalar> options;
  BoolMatrix keep;
  Matrix<Scalar> bias;
  set_masks(kind, n_q, n_k, seed + 3, options, keep, bias);

  Matrix<Scalar> weights;
  const Matrix<Scalar> reference = attn::attention(q, k, v, options, weights);
  const double tol = agreement<Scalar>(reference);
  // Default tiles, and small ones that cut these shapes into many partial tiles.
  const Matrix<Scalar> flash = attn::flash_attention(q, k, v, options);
  CHECK(max_abs_difference(flash, reference) <= tol);
  const Matrix<Scalar> small_tiles = attn::flash_attention<16, 32>(q, k, v, attn::Heads{}, options);
  CHECK(max_abs_difference(small_tiles, reference) <= tol);
  REQUIRE(flash.allFinite());
}

TEMPLATE_TEST_CASE("the worked example through the tiled kernel", "[flash][golden]", float, double) {
  using Scalar = TestType;
  Matrix<Scalar> queries(3, 3), keys(3, 3), values(3, 3);
  queries << 1, 0, 2, 2, 2, 2, 2, 1, 3;
  keys << 0, 1, 1, 4, 4, 0, 2, 3, 1;
  values << 1, 2, 3, 2, 8, 0, 2, 6, 3;
  const double digits = std::is_same_v<Scalar, float> ? 1e-6 : 1e-9;
  attn::AttentionOptions<Scalar> unscaled;
  unscaled.scale = Scalar(1);
  const Matrix<Scalar> outputs = attn::flash_attention(queries, keys, values, unscaled);
  const double expected_1[3][3] = {{1.9366210617, 6.6831053083, 1.5950684075},
                                   {1.9999939663, 7.9639915951, 0.0539764053},
                                   {1.9997046128, 7.7598922547, 0.3583892947}};
  const Matrix<Scalar> scaled = attn::flash_attention(queries, keys, values);
  const double expected_default[3][3] = {{1.8638742024, 6.3193710122, 1.7041886963},
                                         {1.9991095526, 7.8141235049, 0.2734720584},
                                         {1.9925551076, 7.4796355918, 0.7358772581}};
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) {
      CHECK_THAT(double(outputs(r, c)), attn_test::WithinRel(expected_1[r][c], digits));
      CHECK_THAT(double(scaled(r, c)), attn_test::WithinRel(expected_default[r][c], digits));
    }
  }
}

TEMPLATE_TEST_CASE("heads side by side, grouped-query and multi-query, match per-head attention", "[flash][heads]",
                   float, double) {
  using Scalar = TestType;
  const auto [num_heads, num_kv_heads] = GENERATE(table<Index, Index>({{1, 1}, {4, 4}, {4, 2}, {6, 3}, {4, 1}}));
  const bool causal = GENERATE(false, true);
  INFO("H=" << num_heads << " H_kv=" << num_kv_heads << " causal=" << causal);
  const Index n_q = 70, n_k = 90, d_k = 8, d_v = 5;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, num_heads * d_k, 81, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, num_kv_heads * d_k, 82, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, num_kv_heads * d_v, 83);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out, lse;
  attn::flash_attention_into<32, 32>(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, out, lse, workspace);
  REQUIRE(out.rows() == n_q);
  REQUIRE(out.cols() == num_heads * d_v);
  REQUIRE(lse.cols() == num_heads);
  const Index group = num_heads / num_kv_heads;
  for (Index head = 0; head < num_heads; ++head) {
    INFO("head " << head);
    // Query head h reads K/V head h / (H / H_kv): the loop reference repeats it.
    const Index kv_head = head / group;
    const Matrix<Scalar> q_head = q.middleCols(head * d_k, d_k);
    const Matrix<Scalar> k_head = k.middleCols(kv_head * d_k, d_k);
    const Matrix<Scalar> v_head = v.middleCols(kv_head * d_v, d_v);
    attn_test::ReferenceMasks masks;
    masks.causal = causal;
    const auto expected = attn_test::reference_attention(q_head.template cast<double>(), k_head.template cast<double>(),
                                                         v_head.template cast<double>(),
                                                         double(attn::default_scale<Scalar>(d_k)), masks);
    CHECK(max_abs_difference(out.middleCols(head * d_v, d_v), expected.output) <=
          attn_test::tolerance<Scalar>(d_k, n_k, 3.0 * std::sqrt(double(d_k))));
  }
}

TEMPLATE_TEST_CASE("log-sum-exp matches the loop reference, and fully masked rows give zeros and −∞", "[flash][lse]",
                   float, double) {
  using Scalar = TestType;
  const Index n_q = 40, n_k = 50, d = 8;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d, 91, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d, 92, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d, 93);
  BoolMatrix keep = random_keep_mask(n_q, n_k, 94, 0.6);
  keep.row(7).setConstant(false);
  attn::AttentionOptions<Scalar> options;
  options.mask = keep;
  options.causal = true;  // with n_q < n_k every row still has keys, but row 7 has none
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out, lse;
  attn::flash_attention_into<16, 16>(q, k, v, attn::Heads{}, options, out, lse, workspace);
  const double scale = double(attn::default_scale<Scalar>(d));
  for (Index i = 0; i < n_q; ++i) {
    double max_score = -std::numeric_limits<double>::infinity();
    std::vector<double> kept;
    for (Index j = 0; j < n_k; ++j) {
      if (!keep(i, j) || j > i + (n_k - n_q)) continue;
      kept.push_back(scale * q.row(i).template cast<double>().dot(k.row(j).template cast<double>()));
      max_score = std::max(max_score, kept.back());
    }
    if (kept.empty()) {
      CHECK(lse(i, 0) == -std::numeric_limits<Scalar>::infinity());
      CHECK(out.row(i).isZero(0));
      continue;
    }
    double total = 0;
    for (const double s : kept) total += std::exp(s - max_score);
    CHECK_THAT(double(lse(i, 0)), attn_test::WithinAbs(max_score + std::log(total), attn_test::tolerance<Scalar>(d, n_k)));
  }
  CHECK(out.allFinite());
}

TEMPLATE_TEST_CASE("splitting the keys anywhere and merging equals the whole", "[flash][merge]", float, double) {
  using Scalar = TestType;
  const Index n_q = 23, n_k = 61, d_k = 8, d_v = 6, num_heads = 2;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, num_heads * d_k, 101, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, num_heads * d_k, 102, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, num_heads * d_v, 103);
  const attn::Heads heads{num_heads, num_heads};
  attn::AttentionOptions<Scalar> options;
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> whole, whole_lse;
  attn::flash_attention_into(q, k, v, heads, options, whole, whole_lse, workspace);
  const double tol = agreement<Scalar>(whole) * 4;
  for (const Index split : {Index(0), Index(1), Index(17), Index(32), Index(60), n_k}) {
    INFO("split at key " << split);
    Matrix<Scalar> out, lse, other_out, other_lse;
    attn::flash_attention_into(q, k.topRows(split), v.topRows(split), heads, options, out, lse, workspace);
    attn::flash_attention_into(q, k.bottomRows(n_k - split), v.bottomRows(n_k - split), heads, options, other_out,
                               other_lse, workspace);
    attn::merge_into(out, lse, other_out, other_lse);
    CHECK(max_abs_difference(out, whole) <= tol);
    CHECK(max_abs_difference(lse, whole_lse) <= tol);
  }
  // Merging with nothing (lse = −∞) changes nothing; two nothings give zeros and −∞.
  Matrix<Scalar> out = whole, lse = whole_lse;
  const Matrix<Scalar> nothing_out = Matrix<Scalar>::Constant(n_q, num_heads * d_v, Scalar(7));
  const Matrix<Scalar> nothing_lse =
      Matrix<Scalar>::Constant(n_q, num_heads, -std::numeric_limits<Scalar>::infinity());
  attn::merge_into(out, lse, nothing_out, nothing_lse);
  CHECK(out == whole);
  CHECK(lse == whole_lse);
  Matrix<Scalar> empty_out = nothing_out, empty_lse = nothing_lse;
  attn::merge_into(empty_out, empty_lse, nothing_out, nothing_lse);
  CHECK(empty_out.isZero(0));
  CHECK_THROWS_AS(attn::merge_into(out, lse, nothing_out.leftCols(3), nothing_lse), attn::dimension_error);
}

TEST_CASE("tiles outside the causal diagonal, the key padding or the window are skipped", "[flash][tiles]") {
  const Index n = 256, d = 8;
  const Eigen::MatrixXf x = random_matrix<float>(n, d, 111);
  attn::Workspacef workspace;
  Eigen::MatrixXf out;
  const auto tiles = [&](const attn::AttentionOptionsf& options) {
    attn::flash_attention_into<64, 64>(x, x, x, attn::Heads{}, options, out, workspace);
    return workspace.tiles_computed();
  };
  attn::AttentionOptionsf options;
  CHECK(tiles(options) == 16);  // 4 query blocks × 4 key blocks
  options.causal = true;
  CHECK(tiles(options) == 1 + 2 + 3 + 4);
  options.causal = false;
  options.valid_keys = 100;
  CHECK(tiles(options) == 4 * 2);  // keys 0–99: one full and one partial block
  options.valid_keys.reset();
  options.causal = true;
  options.window = attn::SlidingWindow{16, -1};
  // Query block b sees keys from 64b − 16 to 64b + 63: two blocks each (one for block 0).
  CHECK(tiles(options) == 1 + 2 + 2 + 2);
  // Heads multiply the work; nothing else changes.
  const Eigen::MatrixXf x3 = random_matrix<float>(n, 3 * d, 112);
  attn::flash_attention_into<64, 64>(x3, x3, x3, attn::Heads{3, 3}, options, out, workspace);
  CHECK(workspace.tiles_computed() == 3 * 7);
}

TEMPLATE_TEST_CASE("decoding: few queries over a long cache split the keys and merge", "[flash][decode]", float,
                   double) {
  using Scalar = TestType;
  const Index n_q = GENERATE(1, 3);
  const Index n_k = 3 * attn::split_key_chunk + 123;  // four chunks, the last one short
  const Index d = 16, num_heads = 4, num_kv_heads = 2;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, num_heads * d, 121, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, num_kv_heads * d, 122, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, num_kv_heads * d, 123);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.valid_keys = n_k - 50;
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out, lse;
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, out, lse, workspace);
  // It did split: the call's plan has four chunks, and each of its work items one chunk.
  const attn::TilePlan plan =
      attn::detail::plan_attention(n_q, n_k, attn::Heads{num_heads, num_kv_heads}, d, d, options);
  CHECK(plan.key_chunks == 4);
  CHECK(plan.item(plan.items - 1).key_end - plan.item(plan.items - 1).key_begin == 123 - 50);
  for (Index head = 0; head < num_heads; ++head) {
    const Index kv_head = head / 2;
    Matrix<Scalar> weights;
    const Matrix<Scalar> reference = attn::attention(q.middleCols(head * d, d), k.middleCols(kv_head * d, d),
                                                     v.middleCols(kv_head * d, d), options, weights);
    CHECK(max_abs_difference(out.middleCols(head * d, d), reference) <= agreement<Scalar>(reference));
  }
}

TEST_CASE("blocks of a few query rows over row-major keys take the row products, which agree with the tile products",
          "[flash][decode][row_products]") {
  // Float only: each operand type compiles the kernel again, and decoding in double
  // (test_multi_head.cpp) takes the same row products over its cache.
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  // Widths below, at and past a SIMD packet (5, 16, 33 in every packet size there is), 1 to
  // 9 rows per block (groups of 3 heads: 1, 2, 3 queries make 3, 6, 9 rows, the last past
  // the row products' 8), every mask, and keys past two split chunks with a short tail.
  const Index d = GENERATE(5, 16, 33);
  const Index n_q = GENERATE(1, 2, 3);
  const MaskKind kind = GENERATE(MaskKind::none, MaskKind::all);
  INFO("d=" << d << " n_q=" << n_q << " masks=" << int(kind));
  const Index n_k = 2 * attn::split_key_chunk + 77, num_heads = 6, num_kv_heads = 2;
  const Matrix<float> q = random_matrix<float>(n_q, num_heads * d, 141, 2.0);
  const Matrix<float> k = random_matrix<float>(n_k, num_kv_heads * d, 142, 2.0);
  const Matrix<float> v = random_matrix<float>(n_k, num_kv_heads * (d + 1), 143);
  attn::AttentionOptionsf options;
  BoolMatrix keep;
  Matrix<float> bias;
  set_masks(kind, n_q, n_k, 144, options, keep, bias);
  const attn::Heads heads{num_heads, num_kv_heads};
  const Matrix<float> by_tiles = attn::flash_attention(q, k, v, heads, options);
  const RowMajor k_rows = k, v_rows = v;
  const Matrix<float> by_rows = attn::flash_attention(q, k_rows, v_rows, heads, options);
  for (Index head = 0; head < num_heads; ++head) {
    INFO("head " << head);
    const Index kv_head = head / 3;
    Matrix<float> weights;
    const Matrix<float> reference = attn::attention(q.middleCols(head * d, d), k.middleCols(kv_head * d, d),
                                                    v.middleCols(kv_head * (d + 1), d + 1), options, weights);
    CHECK(max_abs_difference(by_rows.middleCols(head * (d + 1), d + 1), reference) <= agreement<float>(reference));
  }
  CHECK(max_abs_difference(by_rows, by_tiles) <= agreement<float>(by_tiles));

  // Keys and values stored in bfloat16: converted in registers by the row products, the
  // float kernel's products on the converted values after.
  using RowMajor16 = Eigen::Matrix<attn::bfloat16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMajor16 k16 = k.cast<attn::bfloat16>(), v16 = v.cast<attn::bfloat16>();
  const RowMajor k_converted = k16.cast<float>(), v_converted = v16.cast<float>();
  const Matrix<float> by_rows16 = attn::flash_attention(q, k16, v16, heads, options);
  const Matrix<float> converted = attn::flash_attention(q, k_converted, v_converted, heads, options);
  CHECK(max_abs_difference(by_rows16, converted) <= agreement<float>(converted));
}

namespace {

// Modifiers that depend on the head, so that a row given the wrong head shows.
struct HeadScoreMod {
  template <typename Scalar>
  Scalar operator()(Scalar score, Index /*query*/, Index key, Index head) const noexcept {
    return score + Scalar(0.25) * Scalar(head) * Scalar(key % 7);
  }
};
struct HeadMaskMod {
  bool operator()(Index /*query*/, Index key, Index head) const noexcept { return (key + head) % 5 != 0; }
};

}  // namespace

TEMPLATE_TEST_CASE("a group's query heads sharing one block (few queries) match one head at a time",
                   "[flash][heads][decode]", float, double) {
  using Scalar = TestType;
  // Few queries make one query block, which a group's query heads then share, with and
  // without the key split.
  const Index n_q = GENERATE(1, 4);
  const Index n_k = GENERATE(Index(300), 2 * attn::split_key_chunk + 77);
  INFO("n_q=" << n_q << " n_k=" << n_k);
  const Index d = 8, num_heads = 6, num_kv_heads = 2;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, num_heads * d, 131, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, num_kv_heads * d, 132, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, num_kv_heads * d, 133);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.window = attn::SlidingWindow{n_k - 40, 0};
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out, lse;
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, out, lse, workspace,
                             attn::Mods{HeadScoreMod{}, HeadMaskMod{}});
  for (Index head = 0; head < num_heads; ++head) {
    INFO("head " << head);
    const Index kv_head = head / 3;
    // The modifiers as explicit matrices, on the reference path.
    Matrix<Scalar> bias(n_q, n_k);
    BoolMatrix keep(n_q, n_k);
    for (Index i = 0; i < n_q; ++i) {
      for (Index j = 0; j < n_k; ++j) {
        bias(i, j) = Scalar(0.25) * Scalar(head) * Scalar(j % 7);
        keep(i, j) = HeadMaskMod{}(i, j, head);
      }
    }
    attn::AttentionOptions<Scalar> explicit_options = options;
    explicit_options.bias = bias;
    explicit_options.mask = keep;
    Matrix<Scalar> weights;
    const Matrix<Scalar> reference = attn::attention(q.middleCols(head * d, d), k.middleCols(kv_head * d, d),
                                                     v.middleCols(kv_head * d, d), explicit_options, weights);
    CHECK(max_abs_difference(out.middleCols(head * d, d), reference) <= agreement<Scalar>(reference));
  }
}

TEMPLATE_TEST_CASE("score and mask modifiers match the reference path with explicit matrices", "[flash][mods]", float,
                   double) {
  using Scalar = TestType;
  const Index n = 90, d = 16;
  const Matrix<Scalar> q = random_matrix<Scalar>(n, d, 131, 6.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n, d, 132, 6.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n, d, 133);
  const Scalar scale = attn::default_scale<Scalar>(d);
  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out;

  SECTION("soft-capping (Gemma 2): cap·tanh(score / cap)") {
    const Scalar cap = 5;
    const auto soft_cap = [cap](Scalar score, Index, Index, Index) { return cap * std::tanh(score / cap); };
    attn::AttentionOptions<Scalar> options;
    options.causal = true;
    attn::flash_attention_into<32, 32>(q, k, v, attn::Heads{}, options, out, workspace,
                                       attn::Mods{soft_cap, attn::NoMaskMod{}});
    // The same through the reference path: a bias that turns each score into its capped value.
    const Matrix<Scalar> scores = scale * q * k.transpose();
    const Matrix<Scalar> bias = (cap * (scores.array() / cap).tanh() - scores.array()).matrix();
    attn::AttentionOptions<Scalar> explicit_options;
    explicit_options.causal = true;
    explicit_options.bias = bias;
    Matrix<Scalar> weights;
    const Matrix<Scalar> reference = attn::attention(q, k, v, explicit_options, weights);
    CHECK(max_abs_difference(out, reference) <= agreement<Scalar>(reference) * 4);
    // The cap bites: uncapped attention differs.
    CHECK(max_abs_difference(attn::flash_attention(q, k, v, options), reference) > 1e-3);
  }
  SECTION("a document mask: tokens attend only within their own segment") {
    std::vector<int> segment(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) segment[static_cast<std::size_t>(i)] = i < 20 ? 0 : (i < 55 ? 1 : 2);
    const auto same_document = [&segment](Index query, Index key, Index) {
      return segment[static_cast<std::size_t>(query)] == segment[static_cast<std::size_t>(key)];
    };
    attn::AttentionOptions<Scalar> options;
    attn::flash_attention_into<32, 32>(q, k, v, attn::Heads{}, options, out, workspace,
                                       attn::Mods{attn::NoScoreMod{}, same_document});
    BoolMatrix keep(n, n);
    for (Index i = 0; i < n; ++i) {
      for (Index j = 0; j < n; ++j) keep(i, j) = same_document(i, j, 0);
    }
    attn::AttentionOptions<Scalar> explicit_options;
    explicit_options.mask = keep;
    Matrix<Scalar> weights;
    const Matrix<Scalar> reference = attn::attention(q, k, v, explicit_options, weights);
    CHECK(max_abs_difference(out, reference) <= agreement<Scalar>(reference));
  }
}

TEMPLATE_TEST_CASE("huge logits stay exact in the tiled kernel", "[flash]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> q = random_matrix<Scalar>(20, 4, 141);
  const Matrix<Scalar> k = random_matrix<Scalar>(300, 4, 142);
  const Matrix<Scalar> v = random_matrix<Scalar>(300, 3, 143);
  attn::AttentionOptions<Scalar> huge;
  huge.scale = Scalar(1e4);
  Matrix<Scalar> weights;
  const Matrix<Scalar> reference = attn::attention(q, k, v, huge, weights);
  const Matrix<Scalar> flash = attn::flash_attention<8, 16>(q, k, v, attn::Heads{}, huge);
  REQUIRE(flash.allFinite());
  // Scores near ±1e4 carry absolute rounding of about 1e4·eps, which moves the weights.
  CHECK(max_abs_difference(flash, reference) <= 1e4 * 16 * std::numeric_limits<Scalar>::epsilon());
}

TEST_CASE("every kind of operand gives the plain matrices' result: blocks, maps, strides, expressions",
          "[flash][operands]") {
  // Operands stored with unit inner stride reach the kernel as one map type per storage
  // order (the same code, so the same bits); the rest (an inner stride, an expression)
  // are read where they are, by code of their own, and agree to rounding.
  const Index n_q = 70, n_k = 300, d = 32;
  const attn::Heads heads{2, 1};
  const Matrix<float> q = random_matrix<float>(n_q, 2 * d, 61);
  const Matrix<float> k = random_matrix<float>(n_k, d, 62);
  const Matrix<float> v = random_matrix<float>(n_k, d, 63);
  attn::AttentionOptionsf options;
  options.causal = true;
  const Matrix<float> expected = attn::flash_attention(q, k, v, heads, options);

  // A block of a larger matrix, and a Map over it with its outer stride.
  Matrix<float> wide = Matrix<float>::Zero(n_k + 5, d + 3);
  wide.block(2, 1, n_k, d) = k;
  const Eigen::Map<const Matrix<float>, 0, Eigen::OuterStride<>> k_map(&wide(2, 1), n_k, d,
                                                                       Eigen::OuterStride<>(wide.outerStride()));
  CHECK(attn::flash_attention(q, wide.block(2, 1, n_k, d), v, heads, options) == expected);
  CHECK(attn::flash_attention(q, k_map, v, heads, options) == expected);

  // Every other row of a buffer: an inner stride of 2, which no map of unit stride holds.
  Matrix<float> interleaved = Matrix<float>::Zero(2 * n_k, d);
  for (Index i = 0; i < n_k; ++i) interleaved.row(2 * i) = v.row(i);
  const Eigen::Map<const Matrix<float>, 0, Eigen::Stride<Eigen::Dynamic, 2>> v_strided(
      interleaved.data(), n_k, d, Eigen::Stride<Eigen::Dynamic, 2>(2 * n_k, 2));
  const double bound = 2e-6 * expected.cwiseAbs().maxCoeff();
  CHECK(max_abs_difference(attn::flash_attention(q, k, v_strided, heads, options), expected) <= bound);
  // An expression without storage: halving and doubling are exact.
  const Matrix<float> half_k = k / 2;
  CHECK(max_abs_difference(attn::flash_attention(q, half_k * 2.0f, v, heads, options), expected) <= bound);

  // 16-bit keys through a stride too: converted entry by entry rather than in runs.
  const Matrix<attn::bfloat16> k16 = k.template cast<attn::bfloat16>();
  Matrix<attn::bfloat16> k16_interleaved = Matrix<attn::bfloat16>::Zero(2 * n_k, d);
  for (Index i = 0; i < n_k; ++i) k16_interleaved.row(2 * i) = k16.row(i);
  const Eigen::Map<const Matrix<attn::bfloat16>, 0, Eigen::Stride<Eigen::Dynamic, 2>> k16_strided(
      k16_interleaved.data(), n_k, d, Eigen::Stride<Eigen::Dynamic, 2>(2 * n_k, 2));
  const Matrix<float> from_k16 = attn::flash_attention(q, k16, v, heads, options);
  CHECK(max_abs_difference(attn::flash_attention(q, k16_strided, v, heads, options), from_k16) <=
        2e-6 * from_k16.cwiseAbs().maxCoeff());
}

TEST_CASE("flash_attention rejects inconsistent heads and shapes", "[flash][errors]") {
  const Eigen::MatrixXf q = Eigen::MatrixXf::Ones(3, 8);
  const Eigen::MatrixXf k = Eigen::MatrixXf::Ones(5, 4);
  const Eigen::MatrixXf v = Eigen::MatrixXf::Ones(5, 6);
  attn::AttentionOptionsf options;
  CHECK_THROWS_WITH(attn::flash_attention(q, k, v, attn::Heads{4, 3}, options),
                    "attn::flash_attention_into: num_heads must be a positive multiple of num_kv_heads, got "
                    "num_heads = 4, num_kv_heads = 3");
  CHECK_THROWS_WITH(attn::flash_attention(q, k, v, attn::Heads{3, 1}, options),
                    "attn::flash_attention_into: q has 8 columns, not a multiple of num_heads = 3 (q is 3x8)");
  CHECK_THROWS_AS(attn::flash_attention(q, k, v, attn::Heads{4, 4}, options), attn::dimension_error);
  CHECK_THROWS_WITH(attn::flash_attention(q, k, v, attn::Heads{4, 4}, options),
                    "attn::flash_attention_into: k has 4 columns but must have num_kv_heads x d_k = 4 x 2 (q is 3x8, "
                    "k is 5x4)");
  CHECK_THROWS_WITH(attn::flash_attention(q, k, v, attn::Heads{4, 4}, options),
                    attn_test::ContainsSubstring("num_kv_heads"));
  CHECK_THROWS_WITH(attn::flash_attention(q, Eigen::MatrixXf(Eigen::MatrixXf::Ones(5, 8)),
                                          Eigen::MatrixXf(Eigen::MatrixXf::Ones(5, 5)), attn::Heads{2, 2}, options),
                    "attn::flash_attention_into: v has 5 columns, not a multiple of num_kv_heads = 2 (v is 5x5)");
  attn::Workspacef workspace;
  Eigen::MatrixXf big = Eigen::MatrixXf::Zero(10, 10);
  CHECK_THROWS_AS(attn::flash_attention_into(q, Eigen::MatrixXf(Eigen::MatrixXf::Ones(5, 8)), v, attn::Heads{}, options,
                                             big.topLeftCorner(3, 5), workspace),
                  attn::dimension_error);
}
