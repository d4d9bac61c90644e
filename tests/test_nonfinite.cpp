// No silently wrong answer: NaN that reaches exactly the outputs depending on it, scores
// that overflow only where their true values do, masked keys that have no influence
// whatever they hold. The rules are the README's ("NaN, infinities and masked garbage");
// every case runs through the tiled kernel and the reference path alike.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::Index;
using attn_test::Matrix;

namespace {

template <typename Scalar>
constexpr Scalar nan_value = std::numeric_limits<Scalar>::quiet_NaN();
template <typename Scalar>
constexpr Scalar infinity = std::numeric_limits<Scalar>::infinity();

/// One call's results through both paths: the tiled kernel (output and log-sum-exp) and the
/// reference path (output and weights).
template <typename Scalar>
struct BothPaths {
  Matrix<Scalar> flash, lse, reference, weights;
};

template <typename Scalar>
BothPaths<Scalar> run_both(const Matrix<Scalar>& q, const Matrix<Scalar>& k, const Matrix<Scalar>& v,
                           const attn::AttentionOptions<Scalar>& options = {}) {
  BothPaths<Scalar> result;
  attn::Workspace<Scalar> workspace;
  attn::flash_attention_into(q, k, v, attn::Heads{}, options, result.flash, result.lse, workspace);
  result.reference = attn::attention(q, k, v, options, result.weights);
  return result;
}

template <typename Derived>
bool all_nan(const Eigen::DenseBase<Derived>& m) {
  return m.unaryExpr([](auto x) { return std::isnan(x); }).all();
}

template <typename Derived>
bool any_nan(const Eigen::DenseBase<Derived>& m) {
  return m.unaryExpr([](auto x) { return std::isnan(x); }).any();
}

/// The clean double reference's output, for comparing the rows and columns a NaN must not
/// reach.
template <typename Scalar>
Eigen::MatrixXd clean_reference(const Matrix<Scalar>& q, const Matrix<Scalar>& k, const Matrix<Scalar>& v,
                                const attn_test::ReferenceMasks& masks = {}) {
  return attn_test::reference_attention(q.template cast<double>(), k.template cast<double>(),
                                        v.template cast<double>(), 1.0 / std::sqrt(double(q.cols())), masks)
      .output;
}

}  // namespace

TEMPLATE_TEST_CASE("a NaN in a query, an attended key or an attended value reaches exactly what depends on it",
                   "[nonfinite][nan]", float, double) {
  using Scalar = TestType;
  // One tile, and keys past the split (the NaN in the first chunk of three).
  const Index n_k = GENERATE(40, 2100);
  INFO("n_k = " << n_k);
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(3, 8, 1);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, 8, 2);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, 2, 3);
  const Eigen::MatrixXd clean = clean_reference(q, k, v);
  const double tolerance = attn_test::tolerance<Scalar>(8, n_k);

  SECTION("a key: every row that attends it, every column, and its log-sum-exp") {
    Matrix<Scalar> bad_k = k;
    bad_k(0, 0) = nan_value<Scalar>;
    const auto result = run_both(q, bad_k, v);
    CHECK(all_nan(result.flash));
    CHECK(all_nan(result.lse));
    CHECK(all_nan(result.reference));
    CHECK(all_nan(result.weights));
  }
  SECTION("a query: its own row only") {
    Matrix<Scalar> bad_q = q;
    bad_q(1, 5) = nan_value<Scalar>;
    const auto result = run_both(bad_q, k, v);
    for (const auto* out : {&result.flash, &result.reference}) {
      CHECK(all_nan(out->row(1)));
      CHECK(attn_test::max_abs_difference(out->row(0), clean.row(0)) <= tolerance);
      CHECK(attn_test::max_abs_difference(out->row(2), clean.row(2)) <= tolerance);
    }
    CHECK(std::isnan(result.lse(1)));
    CHECK(std::isfinite(result.lse(0)));
    CHECK(all_nan(result.weights.row(1)));
  }
  SECTION("a value: its column only, in every row that attends its key") {
    Matrix<Scalar> bad_v = v;
    bad_v(7, 1) = nan_value<Scalar>;
    const auto result = run_both(q, k, bad_v);
    for (const auto* out : {&result.flash, &result.reference}) {
      CHECK(all_nan(out->col(1)));
      CHECK(attn_test::max_abs_difference(out->col(0), clean.col(0)) <= tolerance);
    }
    CHECK(result.lse.allFinite());
    CHECK(result.weights.allFinite());
  }
  SECTION("a key only the last query may attend (causal): the last row only") {
    attn::AttentionOptions<Scalar> options;
    options.causal = true;
    Matrix<Scalar> bad_k = k;
    bad_k(n_k - 1, 3) = nan_value<Scalar>;
    const auto result = run_both(q, bad_k, v, options);
    attn_test::ReferenceMasks masks;
    masks.causal = true;
    const Eigen::MatrixXd clean_causal = clean_reference(q, k, v, masks);
    for (const auto* out : {&result.flash, &result.reference}) {
      CHECK(all_nan(out->row(2)));
      CHECK(attn_test::max_abs_difference(out->topRows(2), clean_causal.topRows(2)) <= tolerance);
    }
    CHECK(std::isnan(result.lse(2)));
    CHECK(result.lse.topRows(2).allFinite());
  }
}

TEMPLATE_TEST_CASE("softmax_rows: a NaN or +inf score makes its whole row NaN, in either storage order",
                   "[nonfinite][nan][softmax]", float, double) {
  using Scalar = TestType;
  Matrix<Scalar> scores = attn_test::random_matrix<Scalar>(4, 6, 5);
  scores(1, 0) = nan_value<Scalar>;
  scores(2, 3) = infinity<Scalar>;
  scores(3, 2) = -infinity<Scalar>;
  const attn_test::RowMajorMatrix<Scalar> row_major = scores;
  const Matrix<Scalar> column_major_weights = attn::softmax_rows(scores);
  const attn_test::RowMajorMatrix<Scalar> row_major_weights = attn::softmax_rows(row_major);
  for (const Matrix<Scalar>& weights : {column_major_weights, Matrix<Scalar>(row_major_weights)}) {
    CHECK(all_nan(weights.row(1)));
    CHECK(all_nan(weights.row(2)));
    CHECK(!any_nan(weights.row(0)));
    CHECK(weights(3, 2) == Scalar(0));
    CHECK(std::abs(weights.row(3).sum() - Scalar(1)) <= Scalar(8) * std::numeric_limits<Scalar>::epsilon());
  }
}

TEMPLATE_TEST_CASE("merge_into keeps a NaN row and never reads an empty side", "[nonfinite][nan][merge]", float,
                   double) {
  using Scalar = TestType;
  Matrix<Scalar> out(3, 2), lse(3, 1), other_out(3, 2), other_lse(3, 1);
  out << 1, 2, 3, 4, 5, 6;
  lse << 0.5, nan_value<Scalar>, -infinity<Scalar>;
  other_out << nan_value<Scalar>, infinity<Scalar>, 7, 8, 9, 10;
  other_lse << -infinity<Scalar>, 0.25, 1.5;
  attn::merge_into(out, lse, other_out, other_lse);
  // Row 0: the other side attended nothing, so its garbage is not read.
  CHECK(out(0, 0) == Scalar(1));
  CHECK(out(0, 1) == Scalar(2));
  CHECK(lse(0) == Scalar(0.5));
  // Row 1: a NaN log-sum-exp is a NaN row, whichever side it is on.
  CHECK(all_nan(out.row(1)));
  CHECK(std::isnan(lse(1)));
  // Row 2: this side attended nothing: the other side's row, as it is.
  CHECK(out(2, 0) == Scalar(9));
  CHECK(out(2, 1) == Scalar(10));
  CHECK(lse(2) == Scalar(1.5));

  Matrix<Scalar> finite_out = Matrix<Scalar>::Ones(1, 2), finite_lse = Matrix<Scalar>::Zero(1, 1);
  const Matrix<Scalar> nan_out = Matrix<Scalar>::Constant(1, 2, nan_value<Scalar>);
  const Matrix<Scalar> nan_lse = Matrix<Scalar>::Constant(1, 1, nan_value<Scalar>);
  attn::merge_into(finite_out, finite_lse, nan_out, nan_lse);
  CHECK(all_nan(finite_out));
  CHECK(std::isnan(finite_lse(0)));
}

TEMPLATE_TEST_CASE("scores overflow only where their true values do, in both paths", "[nonfinite][overflow]", float,
                   double) {
  using Scalar = TestType;
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  // Each side's magnitudes: the product of two overflows where the scaled score does not.
  const Scalar big = is_float ? Scalar(1e20) : Scalar(1e160);
  // d odd: no logit is a sum of ±big² terms that cancels to exactly 0.
  const Index d = 5, n = 5;
  const Matrix<Scalar> signs = attn_test::random_matrix<Scalar>(n, d, 7).array().sign().matrix();
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n, 3, 8);

  const auto check_against_double = [&](const Matrix<Scalar>& q, const Matrix<Scalar>& k, Scalar scale) {
    attn::AttentionOptions<Scalar> options;
    options.scale = scale;
    const auto result = run_both(q, k, v, options);
    // The true logits, from q and k in long double: none overflows there.
    Eigen::MatrixXd expected = Eigen::MatrixXd::Zero(n, v.cols());
    for (Index i = 0; i < n; ++i) {
      std::vector<long double> logits(n);
      long double max_logit = -std::numeric_limits<long double>::infinity();
      for (Index j = 0; j < n; ++j) {
        long double s = 0;
        for (Index c = 0; c < d; ++c) s += static_cast<long double>(q(i, c)) * static_cast<long double>(k(j, c));
        logits[j] = s * static_cast<long double>(scale);
        max_logit = std::max(max_logit, logits[j]);
      }
      long double total = 0;
      for (Index j = 0; j < n; ++j) total += std::exp(logits[j] - max_logit);
      for (Index j = 0; j < n; ++j) {
        for (Index c = 0; c < v.cols(); ++c) {
          expected(i, c) += static_cast<double>(std::exp(logits[j] - max_logit) / total) * double(v(j, c));
        }
      }
    }
    CHECK(attn_test::max_abs_difference(result.flash, expected) <= attn_test::tolerance<Scalar>(d, n));
    CHECK(attn_test::max_abs_difference(result.reference, expected) <= attn_test::tolerance<Scalar>(d, n));
    CHECK(result.lse.allFinite());
  };

  SECTION("a shrinking scale: q·k overflows, scale·q·k does not") {
    // q = ±big, key j = ±big·(1 + j/8), scale = 1e20/big²: logits of up to ±7.5e20, no
    // two of a row equal. Equal logits this large would make the expected output depend
    // on their last bits: a rounding of 1e-16 of them is 1e4, which any valid order of
    // the sums (fused or not) may leave in one and not the other.
    const Matrix<Scalar> q = big * signs;
    const Eigen::Array<Scalar, Eigen::Dynamic, 1> key_scale =
        Eigen::Array<Scalar, Eigen::Dynamic, 1>::LinSpaced(n, Scalar(1), Scalar(1) + Scalar(n - 1) / 8);
    const Matrix<Scalar> k = big * (key_scale.matrix().asDiagonal() * signs.reverse());
    check_against_double(q, k, Scalar(1e20) / big / big);
  }
  SECTION("a growing scale: scale·q overflows, scale·(q·k) does not") {
    const Scalar huge = is_float ? Scalar(1e36) : Scalar(1e306);
    const Scalar tiny = is_float ? Scalar(1e-30) : Scalar(1e-300);
    const Matrix<Scalar> q = huge * signs;
    const Matrix<Scalar> k = tiny * attn_test::random_matrix<Scalar>(n, d, 9);
    check_against_double(q, k, Scalar(1e3));
  }
}

TEMPLATE_TEST_CASE("a finite bias never masks a key nor makes a row NaN; a -inf bias masks whatever the score",
                   "[nonfinite][overflow][bias]", float, double) {
  using Scalar = TestType;
  const Scalar max = std::numeric_limits<Scalar>::max();
  // One key: whatever its score, its value is the output.
  Matrix<Scalar> q(1, 1), k(1, 1), v(1, 1), bias(1, 1);
  q << -std::sqrt(max) / 2;  // the score q·k = −max/4 ...
  k << std::sqrt(max) / 2;
  v << 7;
  bias << -max;  // ... plus −max overflows to −∞ unless it saturates
  attn::AttentionOptions<Scalar> options;
  options.scale = Scalar(1);
  options.bias = bias;
  auto result = run_both(q, k, v, options);
  CHECK(result.flash(0, 0) == Scalar(7));
  CHECK(result.reference(0, 0) == Scalar(7));
  CHECK(result.lse(0) == std::numeric_limits<Scalar>::lowest());

  // Two keys, both pushed past +max: +∞ − +∞ would make the row NaN; saturated, they tie.
  Matrix<Scalar> q2(1, 1), k2(2, 1), v2(2, 1), bias2(1, 2);
  q2 << std::sqrt(max) / 2;
  k2 << std::sqrt(max) / 2, std::sqrt(max) / 2;
  v2 << 2, 4;
  bias2 << max, max;
  options.bias = bias2;
  result = run_both(q2, k2, v2, options);
  CHECK(result.flash(0, 0) == Scalar(3));
  CHECK(result.reference(0, 0) == Scalar(3));

  // A −∞ bias masks its key even when the score is NaN (a padded key full of garbage).
  Matrix<Scalar> k3 = k2, bias3(1, 2);
  k3(1, 0) = nan_value<Scalar>;
  bias3 << 0, -infinity<Scalar>;
  options.bias = bias3;
  result = run_both(q2, k3, v2, options);
  CHECK(result.flash(0, 0) == Scalar(2));
  CHECK(result.reference(0, 0) == Scalar(2));
  CHECK(result.weights(0, 1) == Scalar(0));
}

TEMPLATE_TEST_CASE("masked keys have no influence whatever their keys and values hold", "[nonfinite][mask]", float,
                   double) {
  using Scalar = TestType;
  const Index n_q = 4, n_k = 6, d = 5;
  const Matrix<Scalar> q = attn_test::random_matrix<Scalar>(n_q, d, 11);
  const Matrix<Scalar> k = attn_test::random_matrix<Scalar>(n_k, d, 12);
  const Matrix<Scalar> v = attn_test::random_matrix<Scalar>(n_k, 3, 13);
  const double tolerance = attn_test::tolerance<Scalar>(d, n_k);

  const auto check_clean = [&](const Matrix<Scalar>& bad_k, const Matrix<Scalar>& bad_v,
                               const attn::AttentionOptions<Scalar>& options, const attn_test::ReferenceMasks& masks) {
    const auto result = run_both(q, bad_k, bad_v, options);
    const Eigen::MatrixXd expected = clean_reference(q, k, v, masks);
    CHECK(attn_test::max_abs_difference(result.flash, expected) <= tolerance);
    CHECK(attn_test::max_abs_difference(result.reference, expected) <= tolerance);
    CHECK(!any_nan(result.lse));
    CHECK(result.weights.allFinite());
  };

  SECTION("padding (valid_keys) holding inf and NaN") {
    Matrix<Scalar> bad_k = k, bad_v = v;
    bad_v(3, 0) = infinity<Scalar>;
    bad_v(4, 1) = nan_value<Scalar>;
    bad_k(5, 2) = nan_value<Scalar>;
    bad_v.row(5).setConstant(-infinity<Scalar>);
    attn::AttentionOptions<Scalar> options;
    options.valid_keys = 3;
    attn_test::ReferenceMasks masks;
    masks.valid_keys = 3;
    check_clean(bad_k, bad_v, options, masks);
  }
  SECTION("a key masked by the keep-mask, in the same tile as attended keys") {
    Matrix<Scalar> bad_k = k, bad_v = v;
    bad_k(2, 0) = infinity<Scalar>;
    bad_v.row(2).setConstant(nan_value<Scalar>);
    attn_test::BoolMatrix keep = attn_test::BoolMatrix::Constant(n_q, n_k, true);
    keep.col(2).setConstant(false);
    attn::AttentionOptions<Scalar> options;
    options.mask = keep;
    attn_test::ReferenceMasks masks;
    masks.keep = keep;
    check_clean(bad_k, bad_v, options, masks);
  }
  SECTION("future keys under the causal rule") {
    Matrix<Scalar> bad_k = k, bad_v = v;
    bad_v(n_k - 1, 0) = infinity<Scalar>;  // only the last query attends the last key
    bad_v(n_k - 2, 2) = nan_value<Scalar>;
    attn::AttentionOptions<Scalar> options;
    options.causal = true;
    const auto result = run_both(q, bad_k, bad_v, options);
    attn_test::ReferenceMasks masks;
    masks.causal = true;
    const Eigen::MatrixXd expected = clean_reference(q, k, v, masks);
    for (const auto* out : {&result.flash, &result.reference}) {
      // Rows 0 and 1 attend neither garbage key; row 2 attends the NaN; row 3 both.
      CHECK(attn_test::max_abs_difference(out->topRows(2), expected.topRows(2)) <= tolerance);
      CHECK(attn_test::max_abs_difference(out->row(2).head(2), expected.row(2).head(2)) <= tolerance);
      CHECK(std::isnan((*out)(2, 2)));
      CHECK(!std::isfinite((*out)(3, 0)));
      CHECK(std::isnan((*out)(3, 2)));
    }
  }
  SECTION("a row with every key masked is zeros and -inf, whatever the values hold") {
    Matrix<Scalar> bad_v = v;
    bad_v.setConstant(nan_value<Scalar>);
    attn_test::BoolMatrix keep = attn_test::BoolMatrix::Constant(n_q, n_k, true);
    keep.row(1).setConstant(false);
    keep.row(0).setConstant(false);
    keep.row(2).setConstant(false);
    keep.row(3).setConstant(false);
    attn::AttentionOptions<Scalar> options;
    options.mask = keep;
    const auto result = run_both(q, k, bad_v, options);
    CHECK(result.flash.isZero(0));
    CHECK(result.reference.isZero(0));
    CHECK((result.lse.array() == -infinity<Scalar>).all());
  }
}
