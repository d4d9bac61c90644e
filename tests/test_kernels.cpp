// The four kernels on their own (projection, scores, softmax, weighted sum), against plain
// double-precision loops over random shapes, in both storage orders and through views.

#include <cmath>
#include <limits>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::max_abs_difference;
using attn_test::random_matrix;
using attn_test::tolerance;
using attn_test::WithinAbs;
using attn_test::WithinRel;
using Eigen::Index;

using attn_test::Matrix;
using attn_test::RowMajorMatrix;

TEMPLATE_TEST_CASE("project matches a loop, with and without bias, through views", "[projection]", float, double) {
  using Scalar = TestType;
  const auto [n, d_model, d_out] = GENERATE(table<Index, Index, Index>({{1, 1, 1}, {3, 4, 3}, {17, 8, 5}, {40, 33, 70}}));
  const auto seed = static_cast<std::uint32_t>(n * 1000 + d_model * 10 + d_out);
  const Matrix<Scalar> x = random_matrix<Scalar>(n, d_model, seed);
  const Matrix<Scalar> w = random_matrix<Scalar>(d_model, d_out, seed + 1);
  const Matrix<Scalar> bias = random_matrix<Scalar>(1, d_out, seed + 2);
  const Eigen::RowVectorXd bias_d = bias.template cast<double>();
  const Eigen::MatrixXd expected = attn_test::reference_project(x.template cast<double>(), w.template cast<double>());
  const Eigen::MatrixXd expected_bias =
      attn_test::reference_project(x.template cast<double>(), w.template cast<double>(), &bias_d);
  const double tol = tolerance<Scalar>(d_model, 0);

  CHECK(max_abs_difference(attn::project(x, w), expected) <= tol);
  CHECK(max_abs_difference(attn::project(x, w, bias), expected_bias) <= tol);
  // A column-vector bias is the same bias.
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> bias_column = bias.transpose();
  CHECK(max_abs_difference(attn::project(x, w, bias_column), expected_bias) <= tol);

  // Row-major input, and x as a Map over a caller buffer with padding between rows.
  const RowMajorMatrix<Scalar> x_row_major = x;
  CHECK(max_abs_difference(attn::project(x_row_major, w), expected) <= tol);
  const Index padded = d_model + 3;
  std::vector<Scalar> buffer(static_cast<std::size_t>(n * padded), Scalar(99));
  Eigen::Map<RowMajorMatrix<Scalar>, 0, Eigen::OuterStride<>> x_map(buffer.data(), n, d_model,
                                                                     Eigen::OuterStride<>(padded));
  x_map = x;
  CHECK(max_abs_difference(attn::project(x_map, w), expected) <= tol);

  // _into a plain matrix of the wrong size (resized) and into a block of a larger one.
  Matrix<Scalar> out(1, 1);
  attn::project_into(x, w, bias, out);
  CHECK(max_abs_difference(out, expected_bias) <= tol);
  Matrix<Scalar> wide = Matrix<Scalar>::Constant(n, d_out + 2, Scalar(7));
  attn::project_into(x, w, wide.middleCols(1, d_out));
  CHECK(max_abs_difference(wide.middleCols(1, d_out), expected) <= tol);
  CHECK((wide.col(0).array() == Scalar(7)).all());
  CHECK((wide.col(d_out + 1).array() == Scalar(7)).all());
}

TEMPLATE_TEST_CASE("QKVProjection projects queries, keys and values", "[projection]", float, double) {
  using Scalar = TestType;
  const Index n = 6, d_model = 5, d_k = 4, d_v = 7;
  const Matrix<Scalar> x = random_matrix<Scalar>(n, d_model, 11);
  const Matrix<Scalar> w_q = random_matrix<Scalar>(d_model, d_k, 12);
  const Matrix<Scalar> w_k = random_matrix<Scalar>(d_model, d_k, 13);
  const Matrix<Scalar> w_v = random_matrix<Scalar>(d_model, d_v, 14);
  const Matrix<Scalar> b_q = random_matrix<Scalar>(1, d_k, 15);
  const Matrix<Scalar> b_k = random_matrix<Scalar>(1, d_k, 16);
  const Matrix<Scalar> b_v = random_matrix<Scalar>(1, d_v, 17);
  const double tol = tolerance<Scalar>(d_model, 0);
  const auto reference = [&](const Matrix<Scalar>& w, const Matrix<Scalar>* b) {
    const Eigen::RowVectorXd bias = b ? Eigen::RowVectorXd(b->template cast<double>()) : Eigen::RowVectorXd();
    return attn_test::reference_project(x.template cast<double>(), w.template cast<double>(), b ? &bias : nullptr);
  };

  const attn::QKVProjection<Scalar> plain(w_q, w_k, w_v);
  CHECK_FALSE(plain.has_bias());
  CHECK(plain.d_model() == d_model);
  CHECK(plain.d_k() == d_k);
  CHECK(plain.d_v() == d_v);
  const auto qkv = plain.project(x);
  CHECK(max_abs_difference(qkv.q, reference(w_q, nullptr)) <= tol);
  CHECK(max_abs_difference(qkv.k, reference(w_k, nullptr)) <= tol);
  CHECK(max_abs_difference(qkv.v, reference(w_v, nullptr)) <= tol);

  const attn::QKVProjection<Scalar> biased(w_q, w_k, w_v, b_q, b_k, b_v);
  CHECK(biased.has_bias());
  const auto qkv_b = biased.project(x);
  CHECK(max_abs_difference(qkv_b.q, reference(w_q, &b_q)) <= tol);
  CHECK(max_abs_difference(qkv_b.k, reference(w_k, &b_k)) <= tol);
  CHECK(max_abs_difference(qkv_b.v, reference(w_v, &b_v)) <= tol);
}

TEMPLATE_TEST_CASE("scaled_scores is scale times q·kᵀ", "[scores]", float, double) {
  using Scalar = TestType;
  const auto [n_q, n_k, d_k] = GENERATE(table<Index, Index, Index>({{1, 1, 1}, {3, 5, 2}, {33, 17, 64}, {70, 90, 8}}));
  const auto seed = static_cast<std::uint32_t>(n_q * 7 + n_k * 3 + d_k);
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, d_k, seed);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, d_k, seed + 1);
  const Scalar scale = attn::default_scale<Scalar>(d_k);
  Eigen::MatrixXd expected(n_q, n_k);
  for (Index i = 0; i < n_q; ++i) {
    for (Index j = 0; j < n_k; ++j) {
      double dot = 0;
      for (Index d = 0; d < d_k; ++d) dot += double(q(i, d)) * double(k(j, d));
      expected(i, j) = double(scale) * dot;
    }
  }
  const double tol = tolerance<Scalar>(d_k, 0);
  CHECK(max_abs_difference(attn::scaled_scores(q, k, scale), expected) <= tol);
  const RowMajorMatrix<Scalar> k_row_major = k;
  CHECK(max_abs_difference(attn::scaled_scores(q, k_row_major, scale), expected) <= tol);
  RowMajorMatrix<Scalar> out;
  attn::scaled_scores_into(q, k, scale, out);
  CHECK(max_abs_difference(out, expected) <= tol);
}

TEMPLATE_TEST_CASE("softmax_rows: rows sum to 1 and match a loop, in both storage orders", "[softmax]", float,
                   double) {
  using Scalar = TestType;
  // 70 rows crosses the column-major path's 32-row chunks.
  const auto [rows, cols] = GENERATE(table<Index, Index>({{1, 1}, {1, 9}, {5, 1}, {31, 7}, {70, 300}, {33, 64}}));
  const auto seed = static_cast<std::uint32_t>(rows * 31 + cols);
  const Matrix<Scalar> scores = random_matrix<Scalar>(rows, cols, seed, 20.0);
  Eigen::MatrixXd expected(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    double max_score = -std::numeric_limits<double>::infinity();
    for (Index c = 0; c < cols; ++c) max_score = std::max(max_score, double(scores(r, c)));
    double total = 0;
    for (Index c = 0; c < cols; ++c) total += std::exp(double(scores(r, c)) - max_score);
    for (Index c = 0; c < cols; ++c) expected(r, c) = std::exp(double(scores(r, c)) - max_score) / total;
  }
  // A score error of δ changes a weight by a relative δ; the scores here are exact inputs.
  const double tol = tolerance<Scalar>(0, cols);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> col_major = attn::softmax_rows(scores);
  RowMajorMatrix<Scalar> row_major = scores;
  attn::softmax_rows_inplace(row_major);
  CHECK(max_abs_difference(col_major, expected) <= tol);
  CHECK(max_abs_difference(row_major, expected) <= tol);
  const Scalar eps = std::numeric_limits<Scalar>::epsilon();
  for (Index r = 0; r < rows; ++r) {
    INFO("row " << r << " of " << rows << "x" << cols);
    // A sum of n positive terms, each with a relative error of about one eps.
    CHECK_THAT(double(col_major.row(r).sum()), WithinAbs(1.0, double(4 * eps) * std::log2(double(cols) + 2)));
    CHECK_THAT(double(row_major.row(r).sum()), WithinAbs(1.0, double(4 * eps) * std::log2(double(cols) + 2)));
    CHECK((col_major.row(r).array() >= Scalar(0)).all());
  }
}

TEMPLATE_TEST_CASE("softmax_rows is unchanged by adding a constant to a row", "[softmax]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> scores = random_matrix<Scalar>(40, 25, 5, 3.0);
  Matrix<Scalar> shifted = scores;
  // Powers of two keep the shifted scores exact, so any difference would be the softmax's.
  for (Index r = 0; r < shifted.rows(); ++r) shifted.row(r).array() += Scalar(std::ldexp(1.0, int(r % 9) - 2));
  CHECK(max_abs_difference(attn::softmax_rows(scores), attn::softmax_rows(shifted)) <=
        8 * std::numeric_limits<Scalar>::epsilon());
}

TEMPLATE_TEST_CASE("softmax_rows is exact for huge logits and zero for masked ones", "[softmax]", float, double) {
  using Scalar = TestType;
  constexpr Scalar inf = std::numeric_limits<Scalar>::infinity();
  Eigen::Matrix<Scalar, 4, 3> scores;
  scores << Scalar(1e4), Scalar(-1e4), Scalar(1e4) - 1,  //
      Scalar(-1e4), Scalar(-1e4), Scalar(-1e4),          //
      -inf, Scalar(3), -inf,                             //
      -inf, -inf, -inf;
  const Eigen::Matrix<Scalar, 4, 3> weights = attn::softmax_rows(scores);
  REQUIRE(weights.allFinite());
  const double e = std::exp(-1.0);
  const double tol = 2 * std::numeric_limits<Scalar>::epsilon();
  CHECK_THAT(double(weights(0, 0)), WithinRel(1 / (1 + e), tol));
  CHECK(weights(0, 1) == Scalar(0));
  CHECK_THAT(double(weights(0, 2)), WithinRel(e / (1 + e), tol));
  for (int c = 0; c < 3; ++c) CHECK_THAT(double(weights(1, c)), WithinRel(1.0 / 3.0, tol));
  CHECK(weights.row(2) == Eigen::Matrix<Scalar, 1, 3>(0, 1, 0));
  // Every key masked: weights of zero, not NaN.
  CHECK(weights.row(3).isZero(0));

  // The same in a dynamic, chunked column-major matrix and in a row-major one.
  Matrix<Scalar> dynamic = scores;
  attn::softmax_rows_inplace(dynamic);
  CHECK(max_abs_difference(dynamic, weights) <= tol);
  RowMajorMatrix<Scalar> row_major = scores;
  attn::softmax_rows_inplace(row_major);
  CHECK(max_abs_difference(row_major, weights) <= tol);
}

TEMPLATE_TEST_CASE("softmax_rows_inplace on a block touches only the block", "[softmax]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> scores = random_matrix<Scalar>(50, 6, 3);
  Matrix<Scalar> partly = scores;
  attn::softmax_rows_inplace(partly.middleRows(10, 35));
  CHECK(partly.topRows(10) == scores.topRows(10));
  CHECK(partly.bottomRows(5) == scores.bottomRows(5));
  // The block is not aligned as a fresh matrix is, so Eigen may take its scalar exp for
  // some entries: equal to an ulp.
  CHECK(max_abs_difference(partly.middleRows(10, 35), attn::softmax_rows(scores.middleRows(10, 35))) <=
        2 * std::numeric_limits<Scalar>::epsilon());
}

TEMPLATE_TEST_CASE("weighted_sum is p·v", "[weighted_sum]", float, double) {
  using Scalar = TestType;
  const auto [n_q, n_k, d_v] = GENERATE(table<Index, Index, Index>({{1, 1, 1}, {3, 3, 3}, {20, 45, 9}, {64, 129, 33}}));
  const auto seed = static_cast<std::uint32_t>(n_q + n_k * 100 + d_v);
  const Matrix<Scalar> p = attn::softmax_rows(random_matrix<Scalar>(n_q, n_k, seed, 4.0));
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, d_v, seed + 1);
  Eigen::MatrixXd expected = Eigen::MatrixXd::Zero(n_q, d_v);
  for (Index i = 0; i < n_q; ++i) {
    for (Index j = 0; j < n_k; ++j) {
      for (Index c = 0; c < d_v; ++c) expected(i, c) += double(p(i, j)) * double(v(j, c));
    }
  }
  const double tol = tolerance<Scalar>(0, n_k);
  CHECK(max_abs_difference(attn::weighted_sum(p, v), expected) <= tol);
  Matrix<Scalar> out;
  attn::weighted_sum_into(p, v, out);
  CHECK(max_abs_difference(out, expected) <= tol);
  const RowMajorMatrix<Scalar> v_row_major = v;
  CHECK(max_abs_difference(attn::weighted_sum(p, v_row_major), expected) <= tol);
}

TEMPLATE_TEST_CASE("weighted_sum over no keys is zero", "[weighted_sum]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> p(3, 0);
  const Matrix<Scalar> v(0, 4);
  const Matrix<Scalar> out = attn::weighted_sum(p, v);
  REQUIRE(out.rows() == 3);
  REQUIRE(out.cols() == 4);
  CHECK(out.isZero(0));
  Matrix<Scalar> into = Matrix<Scalar>::Constant(3, 4, Scalar(5));
  attn::weighted_sum_into(p, v, into);
  CHECK(into.isZero(0));
}
