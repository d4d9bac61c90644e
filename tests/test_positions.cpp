// Positions: rotary position embedding (rope.hpp) against loop references written from the
// papers' own formulations, its defining properties (relative positions, identity at 0,
// norms, the two pair layouts), its errors; ALiBi's slopes (alibi.hpp) against the paper's
// rule, and its score modifier in the tiled kernel against the reference path with an
// explicit bias matrix.

#include <cmath>
#include <complex>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <attn/alibi.hpp>
#include <attn/attn.hpp>
#include <attn/rope.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::Matrix;
using attn_test::max_abs_difference;
using attn_test::random_matrix;
using Eigen::Index;

namespace {

using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

const char* style_name(attn::RopeStyle style) {
  return style == attn::RopeStyle::halves ? "halves" : "interleaved";
}

/// RoPE in double, written the two ways the models write it rather than as the library does:
/// - halves, as Hugging Face's Llama: x·cos + rotate_half(x)·sin, where cos and sin repeat
///   the d/2 frequencies twice and rotate_half(x) = (−x[d/2:], x[:d/2]);
/// - interleaved, as RoFormer's complex form: (x[2i] + i·x[2i+1]) · e^(i·θ).
/// θ_i = position · base^(−2i/d).
Eigen::MatrixXd reference_rope(const Eigen::MatrixXd& x, const std::vector<Index>& positions, Index head_dim,
                               double base, attn::RopeStyle style) {
  Eigen::MatrixXd out(x.rows(), x.cols());
  const Index half = head_dim / 2;
  for (Index r = 0; r < x.rows(); ++r) {
    const double position = static_cast<double>(positions[static_cast<std::size_t>(r)]);
    for (Index first = 0; first < x.cols(); first += head_dim) {
      if (style == attn::RopeStyle::halves) {
        for (Index c = 0; c < head_dim; ++c) {
          const double theta = position * std::pow(base, -2.0 * static_cast<double>(c % half) / double(head_dim));
          const double rotated_half = c < half ? -x(r, first + c + half) : x(r, first + c - half);
          out(r, first + c) = x(r, first + c) * std::cos(theta) + rotated_half * std::sin(theta);
        }
      } else {
        for (Index i = 0; i < half; ++i) {
          const double theta = position * std::pow(base, -2.0 * static_cast<double>(i) / double(head_dim));
          const std::complex<double> z(x(r, first + 2 * i), x(r, first + 2 * i + 1));
          const std::complex<double> turned = z * std::polar(1.0, theta);
          out(r, first + 2 * i) = turned.real();
          out(r, first + 2 * i + 1) = turned.imag();
        }
      }
    }
  }
  return out;
}

/// Error bound against the double reference: a few roundings of the values, plus the
/// rounding of angles up to max_position (about ε_double · position radians in any
/// precision, since the angles are formed in double).
template <typename Scalar>
double rope_tolerance(double magnitude, Index max_position) {
  const double eps = static_cast<double>(std::numeric_limits<Scalar>::epsilon());
  return 8.0 * eps * magnitude +
         64.0 * std::numeric_limits<double>::epsilon() * static_cast<double>(std::max<Index>(max_position, 1)) * magnitude;
}

}  // namespace

TEMPLATE_TEST_CASE("apply_rope matches a loop reference for both styles", "[rope]", float, double) {
  using Scalar = TestType;
  const Index head_dim = GENERATE(2, 4, 8, 64, 160);  // 160: more pairs than one stack chunk
  const Index num_heads = GENERATE(1, 3);
  const attn::RopeStyle style = GENERATE(attn::RopeStyle::halves, attn::RopeStyle::interleaved);
  const double base = GENERATE(10000.0, 500000.0, 7.5);
  INFO("head_dim=" << head_dim << " heads=" << num_heads << " style=" << style_name(style) << " base=" << base);
  const std::vector<Index> positions = {0, 1, 2, 17, 255, 4096, 4097, -3, 100000};
  const auto n = static_cast<Index>(positions.size());
  const Matrix<Scalar> x = random_matrix<Scalar>(n, num_heads * head_dim, 7, 2.0);
  Eigen::VectorXi positions_int(n);
  IndexVector positions_index(n);
  for (Index r = 0; r < n; ++r) {
    positions_int(r) = static_cast<int>(positions[static_cast<std::size_t>(r)]);
    positions_index(r) = positions[static_cast<std::size_t>(r)];
  }
  const Eigen::MatrixXd expected = reference_rope(x.template cast<double>(), positions, head_dim, base, style);
  const double tol = rope_tolerance<Scalar>(2.0, 100000);

  const Matrix<Scalar> rotated = attn::apply_rope(x, positions_int, head_dim, attn::Rope{base, style});
  CHECK(max_abs_difference(rotated, expected) <= tol);
  // Any integer type, either orientation, and the in-place form agree bitwise.
  CHECK(attn::apply_rope(x, positions_index, head_dim, attn::Rope{base, style}) == rotated);
  Matrix<Scalar> in_place = x;
  attn::apply_rope_inplace(in_place, positions_int.transpose(), head_dim, attn::Rope{base, style});
  CHECK(in_place == rotated);
}

TEMPLATE_TEST_CASE("RoPE scores depend only on the distance between positions", "[rope]", float, double) {
  using Scalar = TestType;
  const Index head_dim = GENERATE(16, 64);
  const attn::RopeStyle style = GENERATE(attn::RopeStyle::halves, attn::RopeStyle::interleaved);
  INFO("head_dim=" << head_dim << " style=" << style_name(style));
  const attn::Rope rope{10000.0, style};
  const Matrix<Scalar> q = random_matrix<Scalar>(1, head_dim, 21);
  const Matrix<Scalar> k = random_matrix<Scalar>(1, head_dim, 22);
  const auto score = [&](Index m, Index n) {
    const Matrix<Scalar> rotated_q = attn::apply_rope(q, m, head_dim, rope);
    const Matrix<Scalar> rotated_k = attn::apply_rope(k, n, head_dim, rope);
    return rotated_q.template cast<double>().row(0).dot(rotated_k.template cast<double>().row(0));
  };
  // |q|·|k| ≤ d/3 on average; the bound is for the worst pair.
  const double tol = rope_tolerance<Scalar>(double(head_dim), 5000) * 4;
  for (const Index distance : {Index(0), Index(3), Index(-5), Index(40)}) {
    INFO("m - n = " << distance);
    const double at_origin = score(distance, 0);
    for (const Index n : {Index(1), Index(7), Index(100), Index(4096), Index(-20)}) {
      INFO("n = " << n);
      CHECK_THAT(score(n + distance, n), attn_test::WithinAbs(at_origin, tol));
    }
  }
  // …and does depend on the distance: the property is not vacuous.
  CHECK(std::abs(score(3, 0) - score(4, 0)) > 1e-3);
  // Without rotation at the origin, distance 0 gives the plain dot product.
  CHECK_THAT(score(0, 0), attn_test::WithinAbs(q.template cast<double>().row(0).dot(k.template cast<double>().row(0)), tol));
}

TEMPLATE_TEST_CASE("position 0 is the identity, and every pair keeps its norm", "[rope]", float, double) {
  using Scalar = TestType;
  const Index head_dim = 32, num_heads = 2, n = 6;
  const attn::RopeStyle style = GENERATE(attn::RopeStyle::halves, attn::RopeStyle::interleaved);
  INFO("style=" << style_name(style));
  const Matrix<Scalar> x = random_matrix<Scalar>(n, num_heads * head_dim, 31, 3.0);
  // cos 0 = 1 and sin 0 = 0 exactly: position 0 leaves every bit alone.
  CHECK(attn::apply_rope(x, Eigen::VectorXi::Zero(n), head_dim, attn::Rope{10000.0, style}) == x);

  const Eigen::VectorXi positions = (Eigen::VectorXi(n) << 0, 1, 5, 999, 4096, -77).finished();
  const Matrix<Scalar> rotated = attn::apply_rope(x, positions, head_dim, attn::Rope{10000.0, style});
  const Index half = head_dim / 2;
  for (Index r = 0; r < n; ++r) {
    for (Index first = 0; first < num_heads * head_dim; first += head_dim) {
      for (Index i = 0; i < half; ++i) {
        const Index a = first + (style == attn::RopeStyle::halves ? i : 2 * i);
        const Index b = first + (style == attn::RopeStyle::halves ? i + half : 2 * i + 1);
        const double before = std::hypot(double(x(r, a)), double(x(r, b)));
        const double after = std::hypot(double(rotated(r, a)), double(rotated(r, b)));
        CHECK_THAT(after, attn_test::WithinAbs(before, 8 * std::numeric_limits<Scalar>::epsilon() * 3.0));
      }
    }
  }
}

TEMPLATE_TEST_CASE("with head_dim 2 a token turns by its position in radians", "[rope]", float, double) {
  using Scalar = TestType;
  // The only pair has frequency base^0 = 1 whatever the base: angle = position exactly, so
  // the unit vectors land on (cos p, sin p) and (−sin p, cos p) to the last bit.
  const double base = GENERATE(10000.0, 3.0, 1e6);
  const attn::RopeStyle style = GENERATE(attn::RopeStyle::halves, attn::RopeStyle::interleaved);
  const Eigen::VectorXi positions = (Eigen::VectorXi(6) << 0, 1, 2, -1, 4096, 100000).finished();
  Matrix<Scalar> x(6, 4);  // two heads: (1, 0) and (0, 1)
  for (Index r = 0; r < 6; ++r) x.row(r) << 1, 0, 0, 1;
  const Matrix<Scalar> rotated = attn::apply_rope(x, positions, 2, attn::Rope{base, style});
  for (Index r = 0; r < 6; ++r) {
    INFO("position " << positions(r));
    const auto c = static_cast<Scalar>(std::cos(static_cast<double>(positions(r))));
    const auto s = static_cast<Scalar>(std::sin(static_cast<double>(positions(r))));
    CHECK(rotated(r, 0) == c);
    CHECK(rotated(r, 1) == s);
    CHECK(rotated(r, 2) == -s);
    CHECK(rotated(r, 3) == c);
  }
}

TEMPLATE_TEST_CASE("halves is interleaved applied to de-interleaved features", "[rope]", float, double) {
  using Scalar = TestType;
  // Halves pairs (x[i], x[i + d/2]); interleaved pairs (x[2i], x[2i+1]), with the same
  // frequency for pair i. Moving feature i to 2i and i + d/2 to 2i+1 turns one into the other.
  const Index head_dim = GENERATE(2, 8, 64);
  const Index num_heads = 3, n = 5;
  const Index half = head_dim / 2;
  const Matrix<Scalar> x = random_matrix<Scalar>(n, num_heads * head_dim, 41);
  const IndexVector positions = (IndexVector(n) << 0, 3, 64, 4096, 12345).finished();
  Matrix<Scalar> interleaved_x(n, x.cols());
  for (Index first = 0; first < x.cols(); first += head_dim) {
    for (Index i = 0; i < half; ++i) {
      interleaved_x.col(first + 2 * i) = x.col(first + i);
      interleaved_x.col(first + 2 * i + 1) = x.col(first + i + half);
    }
  }
  const Matrix<Scalar> halves = attn::apply_rope(x, positions, head_dim, attn::Rope{10000.0, attn::RopeStyle::halves});
  const Matrix<Scalar> interleaved =
      attn::apply_rope(interleaved_x, positions, head_dim, attn::Rope{10000.0, attn::RopeStyle::interleaved});
  Matrix<Scalar> back(n, x.cols());
  for (Index first = 0; first < x.cols(); first += head_dim) {
    for (Index i = 0; i < half; ++i) {
      back.col(first + i) = interleaved.col(first + 2 * i);
      back.col(first + i + half) = interleaved.col(first + 2 * i + 1);
    }
  }
  CHECK(back == halves);
  if (head_dim > 2) CHECK(max_abs_difference(interleaved, halves) > 1e-3);  // the layouts do differ
}

TEST_CASE("apply_rope works in place on blocks and from a first position", "[rope]") {
  const Index head_dim = 8, n = 9;
  const Eigen::MatrixXf original = random_matrix<float>(n, 5 * head_dim, 51);
  const Eigen::VectorXi positions = Eigen::VectorXi::LinSpaced(n, 37, 37 + n - 1);

  SECTION("a block of columns: the heads inside turn, the rest stays untouched") {
    Eigen::MatrixXf big = original;
    attn::apply_rope_inplace(big.middleCols(head_dim, 2 * head_dim), positions, head_dim);
    CHECK(big.leftCols(head_dim) == original.leftCols(head_dim));
    CHECK(big.rightCols(2 * head_dim) == original.rightCols(2 * head_dim));
    const Eigen::MatrixXf expected = attn::apply_rope(original.middleCols(head_dim, 2 * head_dim), positions, head_dim);
    CHECK(big.middleCols(head_dim, 2 * head_dim) == expected);
    CHECK(big.middleCols(head_dim, 2 * head_dim) != original.middleCols(head_dim, 2 * head_dim));
  }
  SECTION("a block of rows, a Ref, a row-major matrix: the same numbers") {
    const Eigen::MatrixXf expected = attn::apply_rope(original, positions, head_dim);
    Eigen::MatrixXf tall = Eigen::MatrixXf::Zero(n + 4, original.cols());
    tall.middleRows(2, n) = original;
    attn::apply_rope_inplace(tall.middleRows(2, n), positions, head_dim);
    CHECK(tall.middleRows(2, n) == expected);
    CHECK(tall.topRows(2).isZero(0));
    CHECK(tall.bottomRows(2).isZero(0));
    Eigen::MatrixXf through_ref = original;
    Eigen::Ref<Eigen::MatrixXf> ref = through_ref;
    attn::apply_rope_inplace(ref, positions, head_dim);
    CHECK(through_ref == expected);
    attn_test::RowMajorMatrix<float> row_major = original;
    attn::apply_rope_inplace(row_major, positions, head_dim);
    CHECK(row_major == expected);
  }
  SECTION("consecutive positions from first_position equal the positions vector") {
    const attn::Rope rope{500000.0, attn::RopeStyle::interleaved};
    CHECK(attn::apply_rope(original, Index(37), head_dim, rope) == attn::apply_rope(original, positions, head_dim, rope));
    Eigen::MatrixXf in_place = original;
    attn::apply_rope_inplace(in_place, 37, head_dim, rope);
    CHECK(in_place == attn::apply_rope(original, positions, head_dim, rope));
    // A KV cache grows in steps: rotating the new rows from where the cache stands is the
    // same as rotating the whole sequence at once.
    Eigen::MatrixXf steps = original;
    attn::apply_rope_inplace(steps.topRows(4), 37, head_dim, rope);
    attn::apply_rope_inplace(steps.bottomRows(n - 4), 37 + 4, head_dim, rope);
    CHECK(steps == in_place);
    const Eigen::VectorXi negative = Eigen::VectorXi::LinSpaced(n, -4, -4 + n - 1);
    CHECK(attn::apply_rope(original, Index(-4), head_dim) == attn::apply_rope(original, negative, head_dim));
  }
  SECTION("no rows and no heads are fine") {
    Eigen::MatrixXf empty(0, 16);
    attn::apply_rope_inplace(empty, Eigen::VectorXi(0), 8);
    attn::apply_rope_inplace(empty, 5, 8);
    Eigen::MatrixXf no_heads(3, 0);
    attn::apply_rope_inplace(no_heads, Eigen::VectorXi::Zero(3), 8);
    CHECK(empty.size() == 0);
  }
}

TEST_CASE("apply_rope rejects bad head sizes, positions and bases", "[rope][errors]") {
  using attn_test::ContainsSubstring;
  const Eigen::MatrixXd x = Eigen::MatrixXd::Ones(4, 12);
  const Eigen::VectorXi positions = Eigen::VectorXi::LinSpaced(4, 0, 3);
  Eigen::MatrixXd target = x;

  CHECK_THROWS_AS(attn::apply_rope(x, positions, 3), std::invalid_argument);
  CHECK_THROWS_WITH(attn::apply_rope(x, positions, 3),
                    "attn::apply_rope: head_dim must be positive and even (features rotate in pairs), got 3");
  CHECK_THROWS_WITH(attn::apply_rope_inplace(target, positions, 0), ContainsSubstring("attn::apply_rope_inplace"));
  CHECK_THROWS_WITH(attn::apply_rope_inplace(target, 0, -2), ContainsSubstring("got -2"));

  CHECK_THROWS_AS(attn::apply_rope(x, positions, 8), attn::dimension_error);
  CHECK_THROWS_WITH(attn::apply_rope(x, positions, 8),
                    "attn::apply_rope: x has 12 columns, not a multiple of head_dim = 8");
  CHECK_THROWS_AS(attn::apply_rope_inplace(target, 0, 8), attn::dimension_error);

  const Eigen::VectorXi short_positions = Eigen::VectorXi::Zero(3);
  CHECK_THROWS_AS(attn::apply_rope(x, short_positions, 4), attn::dimension_error);
  CHECK_THROWS_WITH(attn::apply_rope_inplace(target, short_positions, 4),
                    "attn::apply_rope_inplace: positions has 3 rows but x has 4 (positions is 3x1, x is 4x12)");
  CHECK_THROWS_WITH(attn::apply_rope(x, Eigen::RowVectorXi::Zero(5), 4),
                    "attn::apply_rope: positions has 5 columns but x has 4 rows (positions is 1x5, x is 4x12)");
  CHECK_THROWS_WITH(attn::apply_rope(x, Eigen::MatrixXi::Zero(2, 2), 4),
                    ContainsSubstring("positions is 2x2 but must be a vector with one entry per row of x (x is 4x12)"));

  for (const double base : {0.0, -10.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    INFO("base " << base);
    CHECK_THROWS_AS(attn::apply_rope(x, positions, 4, attn::Rope{base}), std::invalid_argument);
    CHECK_THROWS_WITH(attn::apply_rope(x, positions, 4, attn::Rope{base}),
                      ContainsSubstring("attn::apply_rope: base must be finite and positive, got"));
    CHECK_THROWS_WITH(attn::apply_rope_inplace(target, 0, 4, attn::Rope{base, attn::RopeStyle::halves}),
                      ContainsSubstring("attn::apply_rope_inplace: base must be finite and positive"));
  }
  // Every check runs before the first write.
  CHECK(target == x);
}

namespace {

/// The paper's `get_slopes`, transcribed: a geometric sequence starting at
/// 2^(−2^−(log2 n − 3)) with that same ratio for a power of two n; otherwise the closest
/// power of two's slopes followed by every other slope of twice that many heads.
std::vector<double> paper_slopes(Index n) {
  const double log2_n = std::log2(static_cast<double>(n));
  if (log2_n == std::floor(log2_n)) {
    const double start = std::pow(2.0, -std::pow(2.0, -(log2_n - 3.0)));
    std::vector<double> slopes;
    for (Index i = 0; i < n; ++i) slopes.push_back(start * std::pow(start, static_cast<double>(i)));
    return slopes;
  }
  const auto closest = static_cast<Index>(std::pow(2.0, std::floor(log2_n)));
  std::vector<double> slopes = paper_slopes(closest);
  const std::vector<double> doubled = paper_slopes(2 * closest);
  for (Index j = 0; static_cast<Index>(slopes.size()) < n; j += 2) slopes.push_back(doubled[static_cast<std::size_t>(j)]);
  return slopes;
}

}  // namespace

TEMPLATE_TEST_CASE("alibi_slopes follows the paper for every head count", "[alibi]", float, double) {
  using Scalar = TestType;
  // Powers of two are exact in binary: 8 heads give 1/2, 1/4, …, 1/256.
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> eight = attn::alibi_slopes<Scalar>(8);
  REQUIRE(eight.size() == 8);
  for (Index h = 0; h < 8; ++h) CHECK(eight(h) == Scalar(1) / Scalar(Index(2) << h));
  CHECK(attn::alibi_slopes<Scalar>(1)(0) == Scalar(1) / Scalar(256));
  CHECK(attn::alibi_slopes<Scalar>(2) == (Eigen::Matrix<Scalar, 2, 1>() << Scalar(1) / 16, Scalar(1) / 256).finished());
  CHECK(attn::alibi_slopes<Scalar>(4) ==
        (Eigen::Matrix<Scalar, 4, 1>() << Scalar(1) / 4, Scalar(1) / 16, Scalar(1) / 64, Scalar(1) / 256).finished());
  // Not a power of two: 6 heads take the 4 slopes of 4 heads, then 2^(−1) and 2^(−3), the
  // first and third of 8 heads'; 3 heads take 2 heads' 1/16, 1/256 and then 1/4.
  CHECK(attn::alibi_slopes<Scalar>(6) == (Eigen::Matrix<Scalar, 6, 1>() << Scalar(1) / 4, Scalar(1) / 16,
                                          Scalar(1) / 64, Scalar(1) / 256, Scalar(1) / 2, Scalar(1) / 8)
                                             .finished());
  CHECK(attn::alibi_slopes<Scalar>(3) ==
        (Eigen::Matrix<Scalar, 3, 1>() << Scalar(1) / 16, Scalar(1) / 256, Scalar(1) / 4).finished());

  const Index num_heads = GENERATE(1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40, 112);
  INFO("H = " << num_heads);
  const std::vector<double> expected = paper_slopes(num_heads);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> slopes = attn::alibi_slopes<Scalar>(num_heads);
  REQUIRE(slopes.size() == num_heads);
  // The library rounds each slope once; the paper's start·ratio^i rounds in pow as well, a few
  // dozen ulps of double at most.
  const double tol = 4 * double(std::numeric_limits<Scalar>::epsilon()) + 1e-13;
  for (Index h = 0; h < num_heads; ++h) {
    INFO("head " << h);
    CHECK_THAT(double(slopes(h)), attn_test::WithinRel(expected[static_cast<std::size_t>(h)], tol));
    CHECK(slopes(h) > 0);
    CHECK(slopes(h) < 1);
  }
  if (num_heads == 12) {
    // 8 heads' slopes, then 2^(−0.5), 2^(−1.5), 2^(−2.5), 2^(−3.5) from 16 heads'.
    CHECK_THAT(double(slopes(8)), attn_test::WithinRel(std::sqrt(0.5), 1e-6));
    CHECK_THAT(double(slopes(11)), attn_test::WithinRel(std::pow(2.0, -3.5), 1e-6));
  }
  if (num_heads == 20) {
    // 16 heads' 2^(−(h+1)/2), then 2^(−0.25), 2^(−0.75), 2^(−1.25), 2^(−1.75) from 32 heads'.
    CHECK_THAT(double(slopes(0)), attn_test::WithinRel(std::sqrt(0.5), 1e-6));
    CHECK(slopes(15) == Scalar(1) / 256);
    CHECK_THAT(double(slopes(16)), attn_test::WithinRel(std::pow(2.0, -0.25), 1e-6));
    CHECK_THAT(double(slopes(19)), attn_test::WithinRel(std::pow(2.0, -1.75), 1e-6));
  }
}

TEST_CASE("alibi_slopes and alibi_score_mod reject what they cannot use", "[alibi][errors]") {
  CHECK_THROWS_AS(attn::alibi_slopes<float>(0), std::invalid_argument);
  CHECK_THROWS_WITH(attn::alibi_slopes<double>(-3), "attn::alibi_slopes: num_heads must be at least 1, got -3");
  const Eigen::MatrixXf not_a_vector = Eigen::MatrixXf::Ones(2, 3);
  CHECK_THROWS_AS(attn::alibi_score_mod(not_a_vector, 4, 4), attn::dimension_error);
  CHECK_THROWS_WITH(attn::alibi_score_mod(not_a_vector, 4, 4), attn_test::ContainsSubstring("slopes is 2x3"));
}

TEST_CASE("the ALiBi modifier subtracts slope times distance, aligned bottom-right", "[alibi]") {
  const Eigen::VectorXd slopes = attn::alibi_slopes<double>(4);
  const attn::AlibiScoreMod<double> square = attn::alibi_score_mod(slopes, 5, 5);
  CHECK(square.query_offset == 0);
  CHECK(square(1.0, 3, 3, 0) == 1.0);
  CHECK(square(1.0, 3, 1, 0) == 1.0 - 0.25 * 2);
  CHECK(square(1.0, 1, 3, 2) == 1.0 - slopes(2) * 2);  // the symmetric form for keys ahead
  // Three new queries over a cache of ten keys: query 0 sits at key 7.
  const attn::AlibiScoreMod<double> decode = attn::alibi_score_mod(slopes, 3, 10);
  CHECK(decode.query_offset == 7);
  CHECK(decode(0.5, 0, 7, 1) == 0.5);
  CHECK(decode(0.5, 2, 0, 3) == 0.5 - slopes(3) * 9);
  // Slopes stored in a row of a column-major matrix are strided.
  Eigen::MatrixXd table = Eigen::MatrixXd::Zero(3, 4);
  table.row(1) = slopes.transpose();
  const attn::AlibiScoreMod<double> from_row = attn::alibi_score_mod(table.row(1), 5, 5);
  for (Index h = 0; h < 4; ++h) CHECK(from_row(0.0, 4, 0, h) == -slopes(h) * 4);
  const Eigen::MatrixXd column = slopes;  // dynamic rows and columns, one column
  CHECK(attn::alibi_score_mod(column, 5, 5)(0.0, 0, 3, 3) == -slopes(3) * 3);
}

TEMPLATE_TEST_CASE("ALiBi in the tiled kernel equals the reference path with an explicit bias", "[alibi][flash]",
                   float, double) {
  using Scalar = TestType;
  // Square, more keys than queries (a cache: the bottom-right offset), more queries than
  // keys (under causal the first rows see nothing), and decoding over a split key range.
  const auto [n_q, n_k] = GENERATE(table<Index, Index>({{40, 40}, {13, 70}, {70, 13}, {1, 1500}, {3, 1100}}));
  const auto [num_heads, num_kv_heads] = GENERATE(table<Index, Index>({{1, 1}, {4, 2}, {3, 3}}));
  const bool causal = GENERATE(false, true);
  INFO("n_q=" << n_q << " n_k=" << n_k << " H=" << num_heads << " H_kv=" << num_kv_heads << " causal=" << causal);
  const Index d_k = 8, d_v = 6;
  const auto seed = static_cast<std::uint32_t>(n_q * 131 + n_k * 7 + num_heads);
  const Matrix<Scalar> q = random_matrix<Scalar>(n_q, num_heads * d_k, seed, 2.0);
  const Matrix<Scalar> k = random_matrix<Scalar>(n_k, num_kv_heads * d_k, seed + 1, 2.0);
  const Matrix<Scalar> v = random_matrix<Scalar>(n_k, num_kv_heads * d_v, seed + 2, 3.0);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> slopes = attn::alibi_slopes<Scalar>(num_heads);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;

  attn::Workspace<Scalar> workspace;
  Matrix<Scalar> out, small_tiles;
  const auto mods = attn::Mods{attn::alibi_score_mod(slopes, n_q, n_k), attn::NoMaskMod{}};
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, out, workspace, mods);
  attn::flash_attention_into<16, 32>(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, small_tiles, workspace,
                                     mods);
  REQUIRE(out.allFinite());

  const Index group = num_heads / num_kv_heads;
  for (Index head = 0; head < num_heads; ++head) {
    INFO("head " << head);
    // The paper's bias for this head, with query i at key position i + n_k − n_q.
    Matrix<Scalar> bias(n_q, n_k);
    for (Index i = 0; i < n_q; ++i) {
      for (Index j = 0; j < n_k; ++j) {
        bias(i, j) = -slopes(head) * static_cast<Scalar>(std::abs(i + (n_k - n_q) - j));
      }
    }
    attn::AttentionOptions<Scalar> explicit_options;
    explicit_options.causal = causal;
    explicit_options.bias = bias;
    const Index kv_head = head / group;
    Matrix<Scalar> weights;
    const Matrix<Scalar> reference = attn::attention(q.middleCols(head * d_k, d_k), k.middleCols(kv_head * d_k, d_k),
                                                     v.middleCols(kv_head * d_v, d_v), explicit_options, weights);
    // test_flash.cpp's bound for the kernel against the reference path: the modifier
    // subtracts exactly what the bias adds, so only the two paths' own roundings differ.
    const double tol =
        (std::is_same_v<Scalar, float> ? 2e-6 : 1e-12) * std::max(1.0, double(reference.cwiseAbs().maxCoeff()));
    CHECK(max_abs_difference(out.middleCols(head * d_v, d_v), reference) <= tol);
    CHECK(max_abs_difference(small_tiles.middleCols(head * d_v, d_v), reference) <= tol);
  }
  // The bias bites: without it the result differs.
  if (n_k > 1) {
    Matrix<Scalar> plain;
    attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_kv_heads}, options, plain, workspace);
    CHECK(max_abs_difference(plain, out) > 1e-3);
  }
}

TEST_CASE("under a causal mask BLOOM's +m·j bias gives the same attention as −m·(i − j)", "[alibi][flash]") {
  const Index n_q = 30, n_k = 45, d = 8, num_heads = 4;
  const Eigen::MatrixXd q = random_matrix<double>(n_q, num_heads * d, 61, 2.0);
  const Eigen::MatrixXd k = random_matrix<double>(n_k, num_heads * d, 62, 2.0);
  const Eigen::MatrixXd v = random_matrix<double>(n_k, num_heads * d, 63);
  const Eigen::VectorXd slopes = attn::alibi_slopes<double>(num_heads);
  const auto bloom = [&slopes](double score, Index, Index key, Index head) {
    return score + slopes(head) * static_cast<double>(key);
  };
  attn::AttentionOptionsd options;
  options.causal = true;
  attn::Workspaced workspace;
  Eigen::MatrixXd ours, ours_lse, theirs, theirs_lse;
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_heads}, options, ours, ours_lse, workspace,
                             attn::Mods{attn::alibi_score_mod(slopes, n_q, n_k), attn::NoMaskMod{}});
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_heads}, options, theirs, theirs_lse, workspace,
                             attn::Mods{bloom, attn::NoMaskMod{}});
  CHECK(max_abs_difference(ours, theirs) <= 1e-12);
  // The log-sum-exp differs by the per-row constant m·(i + n_k − n_q).
  for (Index i = 0; i < n_q; ++i) {
    for (Index h = 0; h < num_heads; ++h) {
      CHECK_THAT(theirs_lse(i, h) - ours_lse(i, h),
                 attn_test::WithinAbs(slopes(h) * static_cast<double>(i + n_k - n_q), 1e-10));
    }
  }
  // Without the mask the two differ: the symmetric form also penalises keys ahead.
  attn::AttentionOptionsd bidirectional;
  Eigen::MatrixXd ours_open, theirs_open;
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_heads}, bidirectional, ours_open, workspace,
                             attn::Mods{attn::alibi_score_mod(slopes, n_q, n_k), attn::NoMaskMod{}});
  attn::flash_attention_into(q, k, v, attn::Heads{num_heads, num_heads}, bidirectional, theirs_open, workspace,
                             attn::Mods{bloom, attn::NoMaskMod{}});
  CHECK(max_abs_difference(ours_open, theirs_open) > 1e-3);
}
