// The worked example of the document attn started from (shared/seed/self-attention.txt):
// a 3×4 input, 4×3 weights, eight steps, checked here to the digit at every step.

#include <cmath>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::WithinAbs;
using attn_test::WithinRel;

namespace {

// Step 1: three inputs of four features, one per row.
template <typename Scalar, int Rows = 3, int Cols = 4>
Eigen::Matrix<Scalar, Rows, Cols> example_inputs() {
  Eigen::Matrix<Scalar, Rows, Cols> x(3, 4);
  x << 1, 0, 1, 0,  //
      0, 2, 0, 2,   //
      1, 1, 1, 1;
  return x;
}

// Step 2: the document's hand-picked weights, d_model = 4 → d_k = d_v = 3.
template <typename Scalar, int Rows = 4, int Cols = 3>
Eigen::Matrix<Scalar, Rows, Cols> example_w_key() {
  Eigen::Matrix<Scalar, Rows, Cols> w(4, 3);
  w << 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0;
  return w;
}

template <typename Scalar, int Rows = 4, int Cols = 3>
Eigen::Matrix<Scalar, Rows, Cols> example_w_query() {
  Eigen::Matrix<Scalar, Rows, Cols> w(4, 3);
  w << 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1;
  return w;
}

template <typename Scalar, int Rows = 4, int Cols = 3>
Eigen::Matrix<Scalar, Rows, Cols> example_w_value() {
  Eigen::Matrix<Scalar, Rows, Cols> w(4, 3);
  w << 0, 2, 0, 0, 3, 0, 1, 0, 3, 1, 1, 0;
  return w;
}

template <typename Scalar>
Eigen::Matrix<Scalar, 3, 3> matrix3(std::initializer_list<double> values) {
  Eigen::Matrix<Scalar, 3, 3> m;
  auto it = values.begin();
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) m(r, c) = static_cast<Scalar>(*it++);
  }
  return m;
}

// The exact softmax of the scale-1 scores, and the outputs at scale 1 and 1/√3, from the
// issue that set this test (each to ten decimals).
const Eigen::Matrix3d expected_softmax = matrix3<double>({0.0633789383, 0.4683105308, 0.4683105308,  //
                                                          0.0000060337, 0.9820078649, 0.0179861014,  //
                                                          0.0002953872, 0.8805369018, 0.1191677110});
const Eigen::Matrix3d expected_outputs_scale_1 =
    matrix3<double>({1.9366210617, 6.6831053083, 1.5950684075,  //
                     1.9999939663, 7.9639915951, 0.0539764053,  //
                     1.9997046128, 7.7598922547, 0.3583892947});
const Eigen::Matrix3d expected_outputs_default_scale =
    matrix3<double>({1.8638742024, 6.3193710122, 1.7041886963,  //
                     1.9991095526, 7.8141235049, 0.2734720584,  //
                     1.9925551076, 7.4796355918, 0.7358772581});

// The printed values carry ten decimals; float carries about seven significant digits.
template <typename Scalar>
double digits_tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-6 : 1e-7;
}

template <typename Scalar, typename Derived>
void require_matches(const Eigen::MatrixBase<Derived>& actual, const Eigen::Matrix3d& expected) {
  REQUIRE(actual.rows() == 3);
  REQUIRE(actual.cols() == 3);
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) {
      INFO("entry (" << r << ", " << c << ")");
      // Relative to the entry, with an absolute floor of the printed precision (5e-11) for
      // the tiny weights such as 0.0000060337.
      const double value = static_cast<double>(actual(r, c));
      CHECK_THAT(value, WithinRel(expected(r, c), digits_tolerance<Scalar>()) || WithinAbs(expected(r, c), 5e-11));
    }
  }
}

// Rounds each row to tenths so that it keeps summing to 1: floor every entry, then hand
// the missing tenths to the entries with the largest remainders.
Eigen::Matrix3d round_keeping_row_sums(const Eigen::Matrix3d& weights) {
  Eigen::Matrix3d rounded;
  for (int r = 0; r < 3; ++r) {
    double remainders[3];
    int tenths[3];
    int total = 0;
    for (int c = 0; c < 3; ++c) {
      const double scaled = weights(r, c) * 10.0;
      tenths[c] = static_cast<int>(std::floor(scaled));
      remainders[c] = scaled - tenths[c];
      total += tenths[c];
    }
    for (; total < 10; ++total) {
      int largest = 0;
      for (int c = 1; c < 3; ++c) {
        if (remainders[c] > remainders[largest]) largest = c;
      }
      tenths[largest] += 1;
      remainders[largest] = -1.0;
    }
    for (int c = 0; c < 3; ++c) rounded(r, c) = tenths[c] / 10.0;
  }
  return rounded;
}

}  // namespace

TEMPLATE_TEST_CASE("worked example, step by step, dynamic sizes", "[golden]", float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix x = example_inputs<Scalar, Eigen::Dynamic, Eigen::Dynamic>();
  const Matrix w_key = example_w_key<Scalar, Eigen::Dynamic, Eigen::Dynamic>();
  const Matrix w_query = example_w_query<Scalar, Eigen::Dynamic, Eigen::Dynamic>();
  const Matrix w_value = example_w_value<Scalar, Eigen::Dynamic, Eigen::Dynamic>();

  // Step 3: small integers all the way, so these are exact in float too.
  const Matrix keys = attn::project(x, w_key);
  const Matrix queries = attn::project(x, w_query);
  const Matrix values = attn::project(x, w_value);
  CHECK(keys == matrix3<Scalar>({0, 1, 1, 4, 4, 0, 2, 3, 1}));
  CHECK(queries == matrix3<Scalar>({1, 0, 2, 2, 2, 2, 2, 1, 3}));
  CHECK(values == matrix3<Scalar>({1, 2, 3, 2, 8, 0, 2, 6, 3}));

  // Step 4: scores for input 1 are [2, 4, 4]; the document uses no scale (scale 1).
  const Matrix scores = attn::scaled_scores(queries, keys, Scalar(1));
  CHECK(scores == matrix3<Scalar>({2, 4, 4, 4, 16, 12, 4, 12, 10}));

  // Step 5: softmax of each row.
  const Matrix weights = attn::softmax_rows(scores);
  require_matches<Scalar>(weights, expected_softmax);
  // The document prints the weights to one decimal, rounded so that each row still sums to
  // 1 (largest remainder): plain rounding would turn input 1's 0.0634 into 0.1 and its row
  // into [0.1, 0.5, 0.5], which sums to 1.1.
  CHECK(round_keeping_row_sums(weights.template cast<double>()) ==
        matrix3<double>({0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.9, 0.1}));
  CHECK(std::round(double(weights(0, 0)) * 10.0) / 10.0 == 0.1);

  // Steps 6–7 as the document does them by hand, with its rounded weights: input 1's output
  // is 0.0·[1,2,3] + 0.5·[2,8,0] + 0.5·[2,6,3] = [2.0, 7.0, 1.5].
  const Matrix rounded_weights = matrix3<Scalar>({0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.9, 0.1});
  const Matrix by_hand = attn::weighted_sum(rounded_weights, values);
  const Eigen::Matrix3d expected_by_hand = matrix3<double>({2.0, 7.0, 1.5, 2.0, 8.0, 0.0, 2.0, 7.8, 0.3});
  const double rounding = 4 * std::numeric_limits<Scalar>::epsilon() * 8;
  for (int c = 0; c < 3; ++c) CHECK_THAT(double(by_hand(0, c)), WithinAbs(expected_by_hand(0, c), rounding));
  // Step 8: the same for inputs 2 and 3.
  CHECK(attn_test::max_abs_difference(by_hand, expected_by_hand) <= rounding);

  // Steps 6–8 with the exact weights.
  const Matrix outputs = attn::weighted_sum(weights, values);
  require_matches<Scalar>(outputs, expected_outputs_scale_1);

  // The composed pipeline gives the same outputs and weights.
  attn::AttentionOptions<Scalar> unscaled;
  unscaled.scale = Scalar(1);
  Matrix composed_weights;
  const Matrix composed = attn::attention(queries, keys, values, unscaled, composed_weights);
  require_matches<Scalar>(composed, expected_outputs_scale_1);
  require_matches<Scalar>(composed_weights, expected_softmax);

  // With the default scale 1/√d_k = 1/√3 (Vaswani et al.).
  CHECK(attn::default_scale<Scalar>(3) == static_cast<Scalar>(1.0 / std::sqrt(3.0)));
  require_matches<Scalar>(attn::attention(queries, keys, values), expected_outputs_default_scale);

  // And from X in one call, through a projection.
  const attn::QKVProjection<Scalar> projection(w_query, w_key, w_value);
  require_matches<Scalar>(attn::self_attention(x, projection, unscaled), expected_outputs_scale_1);
  require_matches<Scalar>(attn::self_attention(x, projection), expected_outputs_default_scale);
}

TEMPLATE_TEST_CASE("worked example, fixed sizes, matches dynamic sizes", "[golden]", float, double) {
  using Scalar = TestType;
  const Eigen::Matrix<Scalar, 3, 4> x = example_inputs<Scalar>();
  const attn::QKVProjection<Scalar, 4, 3, 3> projection(example_w_query<Scalar>(), example_w_key<Scalar>(),
                                                        example_w_value<Scalar>());
  const auto qkv = projection.project(x);
  STATIC_REQUIRE(std::is_same_v<std::decay_t<decltype(qkv.q)>, Eigen::Matrix<Scalar, 3, 3>>);
  CHECK(qkv.k == matrix3<Scalar>({0, 1, 1, 4, 4, 0, 2, 3, 1}));
  CHECK(qkv.q == matrix3<Scalar>({1, 0, 2, 2, 2, 2, 2, 1, 3}));
  CHECK(qkv.v == matrix3<Scalar>({1, 2, 3, 2, 8, 0, 2, 6, 3}));

  attn::AttentionOptions<Scalar> unscaled;
  unscaled.scale = Scalar(1);
  Eigen::Matrix<Scalar, 3, 3> weights;
  const auto fixed_outputs = attn::self_attention(x, projection, unscaled, weights);
  STATIC_REQUIRE(std::is_same_v<std::decay_t<decltype(fixed_outputs)>, Eigen::Matrix<Scalar, 3, 3>>);
  require_matches<Scalar>(fixed_outputs, expected_outputs_scale_1);
  require_matches<Scalar>(weights, expected_softmax);
  const auto fixed_default = attn::self_attention(x, projection);
  require_matches<Scalar>(fixed_default, expected_outputs_default_scale);

  // The dynamic-size run of the same example gives the same numbers to the last bit or
  // two of the largest entry (the values reach 8): Eigen evaluates small fixed and dynamic
  // products and exps by different code paths, which may round differently by an ulp.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const attn::QKVProjection<Scalar> dynamic_projection(Matrix(example_w_query<Scalar>()), Matrix(example_w_key<Scalar>()),
                                                       Matrix(example_w_value<Scalar>()));
  const Matrix dynamic_x = x;
  Matrix dynamic_weights;
  const Matrix dynamic_outputs = attn::self_attention(dynamic_x, dynamic_projection, unscaled, dynamic_weights);
  const double ulps = 2 * std::numeric_limits<Scalar>::epsilon() * 8;
  const Matrix dynamic_default = attn::self_attention(dynamic_x, dynamic_projection);
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) {
      CHECK_THAT(double(dynamic_outputs(r, c)), WithinAbs(double(fixed_outputs(r, c)), ulps));
      CHECK_THAT(double(dynamic_weights(r, c)), WithinAbs(double(weights(r, c)), ulps / 8));
      CHECK_THAT(double(dynamic_default(r, c)), WithinAbs(double(fixed_default(r, c)), ulps));
    }
  }
}

TEST_CASE("worked example: float and double agree to float precision", "[golden]") {
  const attn::QKVProjection<float, 4, 3, 3> projection_f(example_w_query<float>(), example_w_key<float>(),
                                                         example_w_value<float>());
  const attn::QKVProjection<double, 4, 3, 3> projection_d(example_w_query<double>(), example_w_key<double>(),
                                                          example_w_value<double>());
  const Eigen::Matrix3f outputs_f = attn::self_attention(example_inputs<float>(), projection_f);
  const Eigen::Matrix3d outputs_d = attn::self_attention(example_inputs<double>(), projection_d);
  CHECK(attn_test::max_abs_difference(outputs_f, outputs_d) <= 8 * 8 * std::numeric_limits<float>::epsilon());
}
