// Every way to call attn wrongly at run time, and the message that says so. (Fixed sizes
// that cannot match fail to compile instead: see tests/compile_fail/.)

#include <limits>
#include <stdexcept>
#include <type_traits>

#include <attn/attn.hpp>

#include "attn_test.hpp"

using attn_test::ContainsSubstring;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

static_assert(std::is_base_of_v<std::invalid_argument, attn::dimension_error>,
              "callers catching std::invalid_argument also catch shape errors");

TEST_CASE("kernels name the operation, the operands and both shapes", "[errors]") {
  const MatrixXd q = MatrixXd::Ones(2, 4);
  const MatrixXd k = MatrixXd::Ones(5, 3);
  CHECK_THROWS_AS(attn::scaled_scores(q, k, 1.0), attn::dimension_error);
  CHECK_THROWS_WITH(attn::scaled_scores(q, k, 1.0),
                    "attn::scaled_scores: q has 4 columns but k has 3 (q is 2x4, k is 5x3)");
  MatrixXd out;
  CHECK_THROWS_WITH(attn::scaled_scores_into(q, k, 1.0, out), ContainsSubstring("attn::scaled_scores_into: q has 4"));

  const MatrixXd p = MatrixXd::Ones(3, 3);
  const MatrixXd v = MatrixXd::Ones(2, 5);
  CHECK_THROWS_AS(attn::weighted_sum(p, v), attn::dimension_error);
  CHECK_THROWS_WITH(attn::weighted_sum(p, v),
                    "attn::weighted_sum: p has 3 columns but v has 2 rows (p is 3x3, v is 2x5)");
  CHECK_THROWS_WITH(attn::weighted_sum_into(p, v, out), ContainsSubstring("attn::weighted_sum_into"));

  const MatrixXd x = MatrixXd::Ones(3, 4);
  const MatrixXd w = MatrixXd::Ones(5, 2);
  CHECK_THROWS_WITH(attn::project(x, w), "attn::project: x has 4 columns but w has 5 rows (x is 3x4, w is 5x2)");
  const MatrixXd w_ok = MatrixXd::Ones(4, 2);
  const Eigen::RowVectorXd bias3 = Eigen::RowVectorXd::Ones(3);
  CHECK_THROWS_WITH(attn::project(x, w_ok, bias3),
                    "attn::project: bias has 3 entries but w has 2 columns (bias is 1x3, w is 4x2)");
  const MatrixXd bias_matrix = MatrixXd::Ones(2, 2);
  CHECK_THROWS_WITH(attn::project(x, w_ok, bias_matrix), "attn::project: bias is 2x2 but must be a vector");
}

TEST_CASE("attention rejects mismatched operands and options", "[errors]") {
  const MatrixXf q = MatrixXf::Ones(3, 4);
  const MatrixXf k = MatrixXf::Ones(5, 4);
  const MatrixXf v = MatrixXf::Ones(5, 2);

  CHECK_THROWS_WITH(attn::attention(q, MatrixXf(MatrixXf::Ones(5, 3)), v),
                    "attn::attention: q has 4 columns but k has 3 (q is 3x4, k is 5x3)");
  CHECK_THROWS_WITH(attn::attention(q, k, MatrixXf(MatrixXf::Ones(6, 2))),
                    "attn::attention: k has 5 rows but v has 6 (k is 5x4, v is 6x2)");

  attn::AttentionOptionsf options;
  const BoolMatrix wrong_mask = BoolMatrix::Constant(5, 3, true);
  options.mask = wrong_mask;
  CHECK_THROWS_AS(attn::attention(q, k, v, options), attn::dimension_error);
  CHECK_THROWS_WITH(attn::attention(q, k, v, options), "attn::attention: mask is 5x3 but must be n_q x n_k = 3x5");

  attn::AttentionOptionsf with_bias;
  const MatrixXf wrong_bias = MatrixXf::Zero(3, 4);
  with_bias.bias = wrong_bias;
  CHECK_THROWS_WITH(attn::attention(q, k, v, with_bias), "attn::attention: bias is 3x4 but must be n_q x n_k = 3x5");

  // A 0×0 mask that was given is a wrong shape, not an absent mask.
  attn::AttentionOptionsf empty_mask;
  const BoolMatrix no_entries(0, 0);
  empty_mask.mask = no_entries;
  CHECK_THROWS_AS(attn::attention(q, k, v, empty_mask), attn::dimension_error);

  attn::AttentionOptionsf padding;
  padding.valid_keys = 6;
  CHECK_THROWS_AS(attn::attention(q, k, v, padding), std::invalid_argument);
  CHECK_THROWS_WITH(attn::attention(q, k, v, padding),
                    "attn::attention: valid_keys must be between 0 and n_k = 5, got 6");
  padding.valid_keys = -1;
  CHECK_THROWS_WITH(attn::attention(q, k, v, padding), ContainsSubstring("got -1"));
  padding.valid_keys = 5;
  CHECK_NOTHROW(attn::attention(q, k, v, padding));

  attn::AttentionOptionsf windowed;
  windowed.window = attn::SlidingWindow{-2, 0};
  CHECK_THROWS_WITH(attn::attention(q, k, v, windowed),
                    "attn::attention: window sides must be -1 (unbounded) or at least 0, got left = -2, right = 0");
  attn::AttentionOptionsf threads;
  threads.num_threads = -1;
  CHECK_THROWS_WITH(attn::attention(q, k, v, threads), "attn::attention: num_threads must be 0 (all) or positive, got -1");

  MatrixXf out, weights;
  CHECK_THROWS_WITH(attn::attention_into(q, k, MatrixXf(MatrixXf::Ones(6, 2)), options, out, weights),
                    ContainsSubstring("attn::attention_into: k has 5 rows but v has 6"));
}

TEST_CASE("a scale must be finite and positive", "[errors]") {
  const MatrixXd q = MatrixXd::Ones(2, 3);
  const MatrixXd k = MatrixXd::Ones(4, 3);
  const MatrixXd v = MatrixXd::Ones(4, 3);
  for (const double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    INFO("scale " << bad);
    CHECK_THROWS_AS(attn::scaled_scores(q, k, bad), std::invalid_argument);
    CHECK_THROWS_WITH(attn::scaled_scores(q, k, bad),
                      ContainsSubstring("attn::scaled_scores: scale must be finite and positive, got"));
    attn::AttentionOptionsd options;
    options.scale = bad;
    CHECK_THROWS_WITH(attn::attention(q, k, v, options), ContainsSubstring("attn::attention: scale must be finite"));
  }
  CHECK_THROWS_WITH(attn::scaled_scores(q, k, -2.0), ContainsSubstring("got -2"));
  CHECK_THROWS_WITH(attn::default_scale<float>(0), "attn::default_scale: d_k must be positive, got 0");
  const MatrixXd no_features(2, 0);
  CHECK_THROWS_WITH(attn::attention(no_features, MatrixXd(4, 0), v),
                    "attn::attention: d_k is 0, so the default scale 1/sqrt(d_k) is undefined; set options.scale");
}

TEST_CASE("outputs of the wrong shape are refused, not overrun", "[errors]") {
  const MatrixXd q = MatrixXd::Ones(3, 4);
  const MatrixXd k = MatrixXd::Ones(5, 4);
  const MatrixXd v = MatrixXd::Ones(5, 2);
  MatrixXd big = MatrixXd::Zero(10, 10);
  MatrixXd weights;
  // A block cannot be resized: one of the wrong size is an error.
  CHECK_THROWS_WITH(attn::attention_into(q, k, v, attn::AttentionOptionsd{}, big.topLeftCorner(3, 3), weights),
                    "attn::attention_into: out is 3x3 but must be the result's shape = 3x2");
  CHECK_THROWS_AS(attn::scaled_scores_into(q, k, 1.0, big.block(0, 0, 2, 5)), attn::dimension_error);
  // So is a fixed-size matrix of the wrong size.
  Eigen::Matrix<double, 3, 3> fixed;
  CHECK_THROWS_WITH(attn::weighted_sum_into(MatrixXd::Ones(3, 5), v, fixed),
                    "attn::weighted_sum_into: out is 3x3 but must be the result's shape = 3x2");
  // A dynamic matrix of the wrong size is resized.
  MatrixXd resizable(1, 1);
  attn::weighted_sum_into(MatrixXd::Ones(3, 5), v, resizable);
  CHECK(resizable.rows() == 3);
  CHECK(resizable.cols() == 2);
}

TEST_CASE("QKVProjection checks its weights", "[errors]") {
  const MatrixXd w4x3 = MatrixXd::Ones(4, 3);
  CHECK_THROWS_WITH(attn::QKVProjectiond(w4x3, MatrixXd(MatrixXd::Ones(4, 2)), w4x3),
                    "attn::QKVProjection: w_q has 3 columns but w_k has 2 (w_q is 4x3, w_k is 4x2)");
  CHECK_THROWS_WITH(attn::QKVProjectiond(w4x3, w4x3, MatrixXd(MatrixXd::Ones(5, 3))),
                    "attn::QKVProjection: w_q has 4 rows but w_v has 5 (w_q is 4x3, w_v is 5x3)");
  const Eigen::RowVectorXd b3 = Eigen::RowVectorXd::Ones(3);
  const Eigen::RowVectorXd b2 = Eigen::RowVectorXd::Ones(2);
  CHECK_THROWS_WITH(attn::QKVProjectiond(w4x3, w4x3, w4x3, b3, b2, b3),
                    "attn::QKVProjection: b_k has 2 entries but w_k has 3 columns (b_k is 1x2, w_k is 4x3)");
  // Dynamic weights handed to a fixed-size projection are checked before they are copied.
  using Fixed = attn::QKVProjection<double, 4, 3, 3>;
  const MatrixXd w5x3 = MatrixXd::Ones(5, 3);
  CHECK_THROWS_WITH(Fixed(w5x3, w5x3, w5x3), "attn::QKVProjection: w_q is 5x3 but must be d_model x d_k = 4x3");
  const MatrixXd w4x2 = MatrixXd::Ones(4, 2);
  CHECK_THROWS_WITH(Fixed(w4x3, w4x3, w4x2), "attn::QKVProjection: w_v is 4x2 but must be d_model x d_v = 4x3");

  const attn::QKVProjectiond projection(w4x3, w4x3, w4x3);
  CHECK_THROWS_WITH(projection.project(MatrixXd(MatrixXd::Ones(2, 5))),
                    "attn::QKVProjection::project: x has 5 columns but w_q has 4 rows (x is 2x5, w_q is 4x3)");
}
