// The composed attention: masks and their semantics, cross-attention, views, empty
// sequences and invariants, against the plain double-precision loop in reference.hpp.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::MaskKind;
using attn_test::max_abs_difference;
using attn_test::random_keep_mask;
using attn_test::random_matrix;
using attn_test::tolerance;
using Eigen::Index;

using attn_test::Matrix;
using attn_test::RowMajorMatrix;
using attn_test::BoolMatrix;

namespace {

// Sums of weights: 1 for a row that attends anything, 0 for a fully masked one.
template <typename Derived>
void require_rows_are_distributions(const Eigen::MatrixBase<Derived>& weights, double tol) {
  for (Index r = 0; r < weights.rows(); ++r) {
    INFO("row " << r);
    const double sum = double(weights.row(r).sum());
    CHECK((std::abs(sum - 1.0) <= tol || sum == 0.0));
    CHECK((weights.row(r).array() >= 0).all());
  }
}

}  // namespace

TEMPLATE_TEST_CASE("attention matches the loop reference for every mask kind", "[attention][property]", float,
                   double) {
  using Scalar = TestType;
  // (n_q, n_k, d_k, d_v): self- and cross-attention, n_q above and below n_k, d_v ≠ d_k.
  const auto [n_q, n_k, d_k, d_v] = GENERATE(table<Index, Index, Index, Index>(
      {{1, 1, 1, 1}, {3, 3, 3, 3}, {5, 9, 4, 6}, {9, 5, 8, 3}, {16, 16, 16, 16}, {33, 47, 64, 32}, {70, 41, 12, 80}}));
  const MaskKind kind =
      GENERATE(MaskKind::none, MaskKind::causal, MaskKind::keep_mask, MaskKind::bias, MaskKind::valid_keys,
               MaskKind::window, MaskKind::all);
  INFO("n_q=" << n_q << " n_k=" << n_k << " d_k=" << d_k << " d_v=" << d_v << " mask=" << name(kind));
  const auto seed = static_cast<std::uint32_t>(((n_q * 131 + n_k) * 17 + d_k) * 7 + d_v);
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d_k, seed, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d_k, seed + 1, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d_v, seed + 2, 3.0);

  attn::AttentionOptions<Scalar> options;
  attn_test::ReferenceMasks masks;
  const bool all = kind == MaskKind::all;
  if (kind == MaskKind::causal || all) {
    options.causal = true;
    masks.causal = true;
  }
  const BoolMatrix keep = random_keep_mask(n_q, n_k, seed + 3, 0.7);
  if (kind == MaskKind::keep_mask || all) {
    options.mask = keep;
    masks.keep = keep;
  }
  Matrix<Scalar> bias = random_matrix<Scalar>(n_q, n_k, seed + 4, 1.5);
  for (Index r = 0; r < n_q; r += 4) bias(r, (r * 7) % n_k) = -std::numeric_limits<Scalar>::infinity();
  if (kind == MaskKind::bias || all) {
    options.bias = bias;
    masks.bias = bias.template cast<double>();
  }
  if (kind == MaskKind::valid_keys || all) {
    options.valid_keys = (n_k * 2 + 2) / 3;
    masks.valid_keys = options.valid_keys;
  }
  if (kind == MaskKind::window || all) {
    // A window reaching 3 keys back and 2 ahead (the ahead side is cut to 0 by causal).
    options.window = attn::SlidingWindow{3, 2};
    masks.window = std::pair<Index, Index>{3, all ? 0 : 2};
  }

  const Scalar scale = attn::default_scale<Scalar>(d_k);
  const auto expected = attn_test::reference_attention(q.template cast<double>(), k.template cast<double>(),
                                                       v.template cast<double>(), double(scale), masks);
  Matrix<Scalar> weights;
  const Matrix<Scalar> output = attn::attention(q, k, v, options, weights);
  REQUIRE(output.allFinite());
  REQUIRE(weights.allFinite());
  // Scores of up to |scale·q·k| ≈ 4√d_k carry d_k rounding errors each; outputs are
  // weighted sums of values up to 3.
  const double tol = tolerance<Scalar>(d_k, n_k, 3.0 * std::sqrt(double(d_k)));
  CHECK(max_abs_difference(output, expected.output) <= tol);
  CHECK(max_abs_difference(weights, expected.weights) <= tol);
  require_rows_are_distributions(weights, tolerance<Scalar>(0, n_k));
  // Without asking for the weights (attn then keeps them row-major, so the softmax takes
  // its other path): the same output.
  CHECK(max_abs_difference(attn::attention(q, k, v, options), expected.output) <= tol);
  RowMajorMatrix<Scalar> row_major_weights;
  CHECK(max_abs_difference(attn::attention(q, k, v, options, row_major_weights), expected.output) <= tol);
  CHECK(max_abs_difference(row_major_weights, expected.weights) <= tol);
}

TEMPLATE_TEST_CASE("causal attention is aligned bottom-right", "[attention][mask]", float, double) {
  using Scalar = TestType;
  attn::AttentionOptions<Scalar> causal;
  causal.causal = true;

  // Two new queries at the end of five keys (decoding with a cache): query 0 is token 3
  // and sees keys 0–3; query 1 is token 4 and sees all five.
  {
    const Matrix<Scalar> q = random_matrix<Scalar>(2, 4, 1);
    const Matrix<Scalar> k = random_matrix<Scalar>(5, 4, 2);
    const Matrix<Scalar> v = random_matrix<Scalar>(5, 3, 3);
    Matrix<Scalar> weights;
    attn::attention(q, k, v, causal, weights);
    CHECK((weights.row(0).head(4).array() > 0).all());
    CHECK(weights(0, 4) == Scalar(0));
    CHECK((weights.row(1).array() > 0).all());
    BoolMatrix expected(2, 5);
    expected << true, true, true, true, false,  //
        true, true, true, true, true;
    CHECK(attn::causal_mask(2, 5) == expected);
    // PyTorch's top-left is_causal would let query 0 see key 0 only: not what attn does.
    CHECK(weights(0, 1) > Scalar(0));
  }
  // More queries than keys: the first n_q − n_k queries precede every key and get zeros.
  {
    const Matrix<Scalar> q = random_matrix<Scalar>(5, 4, 4);
    const Matrix<Scalar> k = random_matrix<Scalar>(2, 4, 5);
    const Matrix<Scalar> v = random_matrix<Scalar>(2, 3, 6);
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, causal, weights);
    CHECK(output.topRows(3).isZero(0));
    CHECK(weights.topRows(3).isZero(0));
    CHECK(weights(3, 0) == Scalar(1));
    CHECK(weights(3, 1) == Scalar(0));
    CHECK(output.row(3) == v.row(0));
    CHECK((weights.row(4).array() > 0).all());
  }
  // Square: the usual lower triangle, and the flag equals the explicit mask.
  {
    const Matrix<Scalar> q = random_matrix<Scalar>(6, 4, 7);
    const Matrix<Scalar> k = random_matrix<Scalar>(6, 4, 8);
    const Matrix<Scalar> v = random_matrix<Scalar>(6, 5, 9);
    const BoolMatrix lower = attn::causal_mask(6, 6);
    for (Index i = 0; i < 6; ++i) {
      for (Index j = 0; j < 6; ++j) CHECK(lower(i, j) == (j <= i));
    }
    attn::AttentionOptions<Scalar> explicit_mask;
    explicit_mask.mask = lower;
    Matrix<Scalar> flag_weights, mask_weights;
    const Matrix<Scalar> by_flag = attn::attention(q, k, v, causal, flag_weights);
    const Matrix<Scalar> by_mask = attn::attention(q, k, v, explicit_mask, mask_weights);
    CHECK(by_flag == by_mask);
    CHECK(flag_weights.template triangularView<Eigen::StrictlyUpper>().toDenseMatrix().isZero(0));
  }
}

TEMPLATE_TEST_CASE("a sliding window equals its explicit mask, one-sided or two-sided", "[attention][mask]", float,
                   double) {
  using Scalar = TestType;
  const auto [n_q, n_k] = GENERATE(table<Index, Index>({{6, 6}, {3, 8}, {8, 3}, {1, 1}}));
  const auto [left, right] = GENERATE(table<Index, Index>({{2, 1}, {0, 0}, {-1, 1}, {2, -1}, {-1, -1}}));
  INFO(n_q << "x" << n_k << " window (" << left << ", " << right << ")");
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, 4, 71);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, 4, 72);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, 3, 73);
  const BoolMatrix explicit_keep = attn::sliding_window_mask(n_q, n_k, attn::SlidingWindow{left, right});
  for (Index i = 0; i < n_q; ++i) {
    for (Index j = 0; j < n_k; ++j) {
      const Index diagonal = i + n_k - n_q;
      CHECK(explicit_keep(i, j) == ((left < 0 || j >= diagonal - left) && (right < 0 || j <= diagonal + right)));
    }
  }
  attn::AttentionOptions<Scalar> windowed;
  windowed.window = attn::SlidingWindow{left, right};
  attn::AttentionOptions<Scalar> masked;
  masked.mask = explicit_keep;
  Matrix<Scalar> windowed_weights, masked_weights;
  RowMajorMatrix<Scalar> row_major_weights;
  CHECK(attn::attention(q, k, v, windowed, windowed_weights) == attn::attention(q, k, v, masked, masked_weights));
  CHECK(windowed_weights == masked_weights);
  attn::attention(q, k, v, windowed, row_major_weights);
  CHECK(max_abs_difference(row_major_weights, masked_weights) <= tolerance<Scalar>(4, n_k));
  // With causal, the window's right side is 0.
  windowed.causal = true;
  const BoolMatrix causal_keep = explicit_keep.array() && attn::causal_mask(n_q, n_k).array();
  masked.mask = causal_keep;
  CHECK(attn::attention(q, k, v, windowed, windowed_weights) == attn::attention(q, k, v, masked, masked_weights));
}

TEST_CASE("a window wider than both sequences is unbounded, however wide", "[attention][mask]") {
  const Matrix<double> q = random_matrix<double>(4, 3, 75);
  const Matrix<double> k = random_matrix<double>(9, 3, 76);
  const Matrix<double> v = random_matrix<double>(9, 2, 77);
  const Index huge = std::numeric_limits<Index>::max();
  attn::AttentionOptionsd unbounded;
  unbounded.window = attn::SlidingWindow{-1, -1};
  for (const attn::SlidingWindow window : {attn::SlidingWindow{huge, huge}, attn::SlidingWindow{-1, huge},
                                           attn::SlidingWindow{huge, -1}}) {
    attn::AttentionOptionsd wide;
    wide.window = window;
    Matrix<double> wide_weights, unbounded_weights;
    CHECK(attn::attention(q, k, v, wide, wide_weights) == attn::attention(q, k, v, unbounded, unbounded_weights));
    CHECK(wide_weights == unbounded_weights);
    CHECK(attn::flash_attention(q, k, v, wide) == attn::flash_attention(q, k, v, unbounded));
    CHECK(attn::sliding_window_mask(4, 9, window).all());
  }
}

TEMPLATE_TEST_CASE("key padding equals its explicit mask", "[attention][mask]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> q = random_matrix<Scalar>(4, 3, 21);
  const Matrix<Scalar> k = random_matrix<Scalar>(7, 3, 22);
  const Matrix<Scalar> v = random_matrix<Scalar>(7, 2, 23);
  attn::AttentionOptions<Scalar> padded;
  padded.valid_keys = 5;
  const BoolMatrix mask = attn::key_padding_mask(4, 7, 5);
  CHECK(mask.leftCols(5).all());
  CHECK_FALSE(mask.rightCols(2).any());
  attn::AttentionOptions<Scalar> masked;
  masked.mask = mask;
  Matrix<Scalar> padded_weights, masked_weights;
  CHECK(attn::attention(q, k, v, padded, padded_weights) == attn::attention(q, k, v, masked, masked_weights));
  CHECK(padded_weights == masked_weights);
  CHECK(padded_weights.rightCols(2).isZero(0));
  // Padding keys do not matter, whatever they hold.
  Matrix<Scalar> k_other = k, v_other = v;
  k_other.bottomRows(2).setConstant(Scalar(1e3));
  v_other.bottomRows(2).setConstant(Scalar(-1e3));
  CHECK(attn::attention(q, k_other, v_other, padded) == attn::attention(q, k, v, padded));
}

TEMPLATE_TEST_CASE("a query with every key masked gets zeros, never NaN", "[attention][mask]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> q = random_matrix<Scalar>(3, 4, 31);
  const Matrix<Scalar> k = random_matrix<Scalar>(5, 4, 32);
  const Matrix<Scalar> v = random_matrix<Scalar>(5, 2, 33);

  SECTION("by a boolean mask") {
    BoolMatrix keep = BoolMatrix::Constant(3, 5, true);
    keep.row(1).setConstant(false);
    attn::AttentionOptions<Scalar> options;
    options.mask = keep;
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, options, weights);
    CHECK(output.row(1).isZero(0));
    CHECK(weights.row(1).isZero(0));
    CHECK(output.allFinite());
    CHECK(weights.row(0).sum() > Scalar(0.99));
  }
  SECTION("by a bias of −∞") {
    Matrix<Scalar> bias = Matrix<Scalar>::Zero(3, 5);
    bias.row(2).setConstant(-std::numeric_limits<Scalar>::infinity());
    attn::AttentionOptions<Scalar> options;
    options.bias = bias;
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, options, weights);
    CHECK(output.row(2).isZero(0));
    CHECK(weights.row(2).isZero(0));
    CHECK(output.allFinite());
  }
  SECTION("by key padding of zero valid keys") {
    attn::AttentionOptions<Scalar> options;
    options.valid_keys = 0;
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, options, weights);
    CHECK(output.isZero(0));
    CHECK(weights.isZero(0));
  }
}

TEMPLATE_TEST_CASE("attention invariants", "[attention][property]", float, double) {
  using Scalar = TestType;
  const Index n_q = 12, n_k = 20, d_k = 8, d_v = 5;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d_k, 41);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d_k, 42);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d_v, 43);
  const double tol = tolerance<Scalar>(d_k, n_k);

  SECTION("permuting keys and values together changes nothing") {
    std::vector<int> order(static_cast<std::size_t>(n_k));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(44));
    Eigen::PermutationMatrix<Eigen::Dynamic> permutation(n_k);
    for (Index j = 0; j < n_k; ++j) permutation.indices()(j) = order[static_cast<std::size_t>(j)];
    const Matrix<Scalar> k_permuted = permutation * k;
    const Matrix<Scalar> v_permuted = permutation * v;
    CHECK(max_abs_difference(attn::attention(q, k_permuted, v_permuted), attn::attention(q, k, v)) <= tol);
  }
  SECTION("adding a constant to a row of scores changes nothing") {
    Matrix<Scalar> bias(n_q, n_k);
    for (Index r = 0; r < n_q; ++r) bias.row(r).setConstant(Scalar(std::ldexp(1.0, int(r) - 4)));
    attn::AttentionOptions<Scalar> shifted;
    shifted.bias = bias;
    CHECK(max_abs_difference(attn::attention(q, k, v, shifted), attn::attention(q, k, v)) <= tol);
  }
  SECTION("huge logits do not overflow") {
    // Scores of about ±1e4: the softmax is one-hot on each query's best key.
    attn::AttentionOptions<Scalar> huge;
    huge.scale = Scalar(1e4);
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, huge, weights);
    REQUIRE(output.allFinite());
    const Matrix<Scalar> scores = q * k.transpose();
    for (Index i = 0; i < n_q; ++i) {
      Index best = 0;
      scores.row(i).maxCoeff(&best);
      CHECK(weights(i, best) > Scalar(0.5));
      CHECK_THAT(double(weights.row(i).sum()), attn_test::WithinAbs(1.0, tol));
    }
  }
  SECTION("scale multiplies the scores") {
    attn::AttentionOptions<Scalar> doubled;
    doubled.scale = Scalar(2) * attn::default_scale<Scalar>(d_k);
    const Matrix<Scalar> q_doubled = Scalar(2) * q;
    CHECK(max_abs_difference(attn::attention(q, k, v, doubled), attn::attention(q_doubled, k, v)) <= tol);
  }
}

TEMPLATE_TEST_CASE("attention takes views and writes into caller storage", "[attention][views]", float, double) {
  using Scalar = TestType;
  const Index n_q = 7, n_k = 9, d_k = 6, d_v = 4;
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d_k, 51);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d_k, 52);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d_v, 53);
  const BoolMatrix keep = random_keep_mask(n_q, n_k, 54, 0.6);
  const Matrix<Scalar> bias = random_matrix<Scalar>(n_q, n_k, 55);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.mask = keep;
  options.bias = bias;
  Matrix<Scalar> plain_weights;
  const Matrix<Scalar> plain = attn::attention(q, k, v, options, plain_weights);
  const double tol = tolerance<Scalar>(d_k, n_k);

  // q row-major, k a Map over a padded buffer, v a block of a wider matrix.
  const RowMajorMatrix<Scalar> q_row_major = q;
  std::vector<Scalar> k_buffer(static_cast<std::size_t>((n_k + 2) * d_k), Scalar(-5));
  Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>> k_map(k_buffer.data(), n_k, d_k, Eigen::OuterStride<>(n_k + 2));
  k_map = k;
  Matrix<Scalar> v_wide = Matrix<Scalar>::Zero(n_k, d_v + 3);
  v_wide.middleCols(2, d_v) = v;
  // The mask a row-major block of a bigger matrix, the bias a row-major copy.
  Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> keep_big =
      Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Constant(n_q + 2, n_k + 3, false);
  keep_big.block(1, 2, n_q, n_k) = keep;
  const RowMajorMatrix<Scalar> bias_row_major = bias;
  attn::AttentionOptions<Scalar> viewed;
  viewed.causal = true;
  viewed.mask = keep_big.block(1, 2, n_q, n_k);
  viewed.bias = bias_row_major;

  // Output into a block of a bigger matrix, weights into a row-major matrix.
  Matrix<Scalar> out_big = Matrix<Scalar>::Constant(n_q + 1, d_v + 1, Scalar(42));
  RowMajorMatrix<Scalar> weights;
  attn::attention_into(q_row_major, k_map, v_wide.middleCols(2, d_v), viewed, out_big.topRightCorner(n_q, d_v),
                       weights);
  CHECK(max_abs_difference(out_big.topRightCorner(n_q, d_v), plain) <= tol);
  CHECK(max_abs_difference(weights, plain_weights) <= tol);
  CHECK((out_big.col(0).array() == Scalar(42)).all());
  CHECK((out_big.row(n_q).array() == Scalar(42)).all());

  // The kernels composed by hand give the same, with the masks applied by mask_scores_inplace.
  Matrix<Scalar> scores = attn::scaled_scores(q, k, attn::default_scale<Scalar>(d_k));
  attn::mask_scores_inplace(scores, options);
  attn::softmax_rows_inplace(scores);
  CHECK(max_abs_difference(attn::weighted_sum(scores, v), plain) <= tol);
  CHECK(max_abs_difference(scores, plain_weights) <= tol);
}

TEMPLATE_TEST_CASE("empty sequences are legal", "[attention][empty]", float, double) {
  using Scalar = TestType;
  attn::AttentionOptions<Scalar> causal;
  causal.causal = true;

  SECTION("no queries: an empty output") {
    const Matrix<Scalar> q(0, 4);
    const Matrix<Scalar> k = random_matrix<Scalar>(3, 4, 61);
    const Matrix<Scalar> v = random_matrix<Scalar>(3, 2, 62);
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, causal, weights);
    CHECK(attn::attention(q, k, v, causal).rows() == 0);
    CHECK(output.rows() == 0);
    CHECK(output.cols() == 2);
    CHECK(weights.rows() == 0);
    CHECK(weights.cols() == 3);
  }
  SECTION("no keys: an output of zeros") {
    const Matrix<Scalar> q = random_matrix<Scalar>(3, 4, 63);
    const Matrix<Scalar> k(0, 4);
    const Matrix<Scalar> v(0, 2);
    Matrix<Scalar> weights;
    const Matrix<Scalar> output = attn::attention(q, k, v, causal, weights);
    REQUIRE(output.rows() == 3);
    REQUIRE(output.cols() == 2);
    CHECK(output.isZero(0));
    CHECK(weights.rows() == 3);
    CHECK(weights.cols() == 0);
    // Without weights attn keeps its own row-major scratch, masked along the other path.
    CHECK(attn::attention(q, k, v, causal).isZero(0));
    Matrix<Scalar> out = Matrix<Scalar>::Constant(3, 2, Scalar(9));
    attn::attention_into(q, k, v, attn::AttentionOptions<Scalar>{}, out, weights);
    CHECK(out.isZero(0));
  }
  SECTION("neither") {
    const Matrix<Scalar> q(0, 4), k(0, 4), v(0, 2);
    const Matrix<Scalar> output = attn::attention(q, k, v);
    CHECK(output.size() == 0);
    CHECK(output.cols() == 2);
  }
}
