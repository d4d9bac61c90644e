#pragma once
/// @file
/// Rotary position embedding (RoPE; Su et al. 2021, "RoFormer: Enhanced Transformer with
/// Rotary Position Embedding"): each pair of a head's features is rotated by an angle
/// proportional to the token's position, so that the dot product of a rotated query and a
/// rotated key depends on their positions only through the difference of the two. Applied to
/// q and k (never v) after the projection and before the scores.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <string>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"

namespace attn {

/// Which features of a head form the rotated pairs. Both rotate pair i by
/// position · base^(−2i/head_dim), i = 0 … head_dim/2 − 1; they differ in where pair i sits,
/// so weights trained with one are wrong under the other.
enum class RopeStyle {
  /// (x[2i], x[2i+1]): the original RoFormer and GPT-J.
  interleaved,
  /// (x[i], x[i + head_dim/2]): GPT-NeoX and Hugging Face Llama's `rotate_half`.
  halves,
};

/// RoPE's parameters: the frequency base (10000 in RoFormer and Llama 1/2; Llama 3 uses
/// 500000) and the pair layout.
struct Rope {
  double base = 10000.0;
  RopeStyle style = RopeStyle::halves;
};

namespace detail {

/// Pairs whose angles are computed at once, in stack buffers shared by all heads of a row
/// (every head of a token sits at the same position). 64 pairs cover head_dim ≤ 128 in one
/// pass; wider heads take several.
inline constexpr Eigen::Index rope_pair_chunk = 64;

inline void check_rope_parameters(const char* operation, Eigen::Index cols, Eigen::Index head_dim, const Rope& rope) {
  if (head_dim <= 0 || head_dim % 2 != 0) {
    raise<std::invalid_argument>(operation, ": head_dim must be positive and even (features rotate in pairs), got ",
                                 head_dim);
  }
  if (cols % head_dim != 0) {
    raise<dimension_error>(operation, ": x has ", cols, " columns, not a multiple of head_dim = ", head_dim);
  }
  if (!(std::isfinite(rope.base) && rope.base > 0.0)) {
    raise<std::invalid_argument>(operation, ": base must be finite and positive, got ", rope.base);
  }
}

/// Positions are a vector, of either orientation, with one entry per row of x.
template <typename DerivedPositions>
void check_rope_positions(const char* operation, const Operand& x, const Eigen::MatrixBase<DerivedPositions>& positions) {
  static_assert(Eigen::NumTraits<typename DerivedPositions::Scalar>::IsInteger,
                "attn::apply_rope: positions must have an integer scalar type (Eigen::VectorXi, or a "
                "vector of Eigen::Index)");
  static_assert(DerivedPositions::RowsAtCompileTime == 1 || DerivedPositions::ColsAtCompileTime == 1 ||
                    DerivedPositions::RowsAtCompileTime == Eigen::Dynamic ||
                    DerivedPositions::ColsAtCompileTime == Eigen::Dynamic,
                "attn::apply_rope: positions must be a vector (one position per row of x)");
  const Operand given = operand("positions", positions);
  if (given.cols == 1) {
    require_extents_match(operation, given, Extent::rows, x, Extent::rows);
  } else if (given.rows == 1) {
    require_extents_match(operation, given, Extent::columns, x, Extent::rows);
  } else {
    raise_shape(operation, given, "a vector with one entry per row of x (x is ", x.shape(), ")");
  }
}

/// Rotates every head of every row of `x` in place; `position_of(r)` gives row r's position.
/// No allocation: the angles of up to `rope_pair_chunk` pairs live on the stack.
template <typename Derived, typename PositionOf>
void apply_rope_unchecked(Eigen::MatrixBase<Derived>& x, const PositionOf& position_of, Eigen::Index head_dim,
                          const Rope& rope) {
  using Scalar = typename Derived::Scalar;
  // x: (n × num_heads·head_dim); each row's angles: (head_dim/2), a chunk at a time
  const Eigen::Index half = head_dim / 2;
  const Eigen::Index num_heads = x.cols() / head_dim;
  const bool interleaved = rope.style == RopeStyle::interleaved;
  std::array<double, rope_pair_chunk> inverse_frequency{};
  std::array<Scalar, rope_pair_chunk> cosine{};
  std::array<Scalar, rope_pair_chunk> sine{};
  for (Eigen::Index first_pair = 0; first_pair < half; first_pair += rope_pair_chunk) {
    const Eigen::Index pairs = std::min(rope_pair_chunk, half - first_pair);
    for (Eigen::Index p = 0; p < pairs; ++p) {
      // base^(−2i/d), written as Hugging Face's 1 / base^(2i/d): pair 0 turns at exactly
      // 1 radian per position.
      const double exponent = static_cast<double>(2 * (first_pair + p)) / static_cast<double>(head_dim);
      inverse_frequency[static_cast<std::size_t>(p)] = 1.0 / std::pow(rope.base, exponent);
    }
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const double position = static_cast<double>(position_of(r));
      for (Eigen::Index p = 0; p < pairs; ++p) {
        // Angles in double, whatever Scalar is, deliberately: Hugging Face forms
        // position · inv_freq in float32, where an angle near 4096 is only known to 5e-4 rad
        // and one near 1e5 to 8e-3 rad (a float's spacing there), so the fast pairs of late
        // tokens turn visibly wrong. Rounding the cosine and sine to Scalar afterwards costs
        // one rounding each.
        const auto index = static_cast<std::size_t>(p);
        const double angle = position * inverse_frequency[index];
        cosine[index] = static_cast<Scalar>(std::cos(angle));
        sine[index] = static_cast<Scalar>(std::sin(angle));
      }
      for (Eigen::Index head = 0; head < num_heads; ++head) {
        const Eigen::Index first_col = head * head_dim;
        for (Eigen::Index p = 0; p < pairs; ++p) {
          const Eigen::Index i = first_pair + p;
          const Eigen::Index a = first_col + (interleaved ? 2 * i : i);
          const Eigen::Index b = first_col + (interleaved ? 2 * i + 1 : i + half);
          const auto index = static_cast<std::size_t>(p);
          const Scalar xa = x(r, a);
          const Scalar xb = x(r, b);
          // (xa, xb) rotated by +angle: RoFormer's eq. (13), rotate_half's x·cos + (−xb, xa)·sin.
          x(r, a) = xa * cosine[index] - xb * sine[index];
          x(r, b) = xb * cosine[index] + xa * sine[index];
        }
      }
    }
  }
}

/// Checks, then rotates `x` with row r at `positions(r)`.
template <typename Derived, typename DerivedPositions>
void apply_rope_checked(const char* operation, Eigen::MatrixBase<Derived>& x,
                        const Eigen::MatrixBase<DerivedPositions>& positions, Eigen::Index head_dim,
                        const Rope& rope) {
  require_floating_point<typename Derived::Scalar>();
  check_rope_parameters(operation, x.cols(), head_dim, rope);
  check_rope_positions(operation, operand("x", x), positions);
  const auto& given = positions.derived();
  if (positions.cols() == 1) {
    apply_rope_unchecked(x, [&given](Eigen::Index r) { return given.coeff(r, 0); }, head_dim, rope);
  } else {
    apply_rope_unchecked(x, [&given](Eigen::Index r) { return given.coeff(0, r); }, head_dim, rope);
  }
}

/// Checks, then rotates `x` with row r at first_position + r.
template <typename Derived>
void apply_rope_checked(const char* operation, Eigen::MatrixBase<Derived>& x, Eigen::Index first_position,
                        Eigen::Index head_dim, const Rope& rope) {
  require_floating_point<typename Derived::Scalar>();
  check_rope_parameters(operation, x.cols(), head_dim, rope);
  apply_rope_unchecked(x, [first_position](Eigen::Index r) { return first_position + r; }, head_dim, rope);
}

}  // namespace detail

/// Rotates, in place, every `head_dim`-wide column block of `x`: x is n × (H·head_dim), heads
/// side by side as `Heads` lays them out, one token per row, and row r sits at position
/// `positions(r)`. Pair i of every head turns by positions(r) · base^(−2i/head_dim) radians.
///
/// `x` may be a matrix, a Map, a Ref or a block of one, including a temporary block such as
/// `q.middleCols(h * head_dim, head_dim)`. It is taken by forwarding reference, as
/// `flash_attention_into` takes its outputs, rather than by Eigen's `const MatrixBase&` and
/// const_cast idiom: that idiom would also accept a const matrix and write into it, while
/// this form refuses one at compile time.
///
/// `positions` is a vector of any integer type (`Eigen::VectorXi`, a vector of `Eigen::Index`,
/// a row vector, an expression such as `Eigen::VectorXi::LinSpaced(…)`) with one entry per
/// row of x; it is read once per row, so pass an evaluated vector rather than a costly
/// expression. Any integer is a valid position, negative ones included: the rotation is
/// defined for every angle.
///
/// Throws `attn::dimension_error` when positions does not have x.rows() entries or head_dim
/// does not divide x.cols(), and `std::invalid_argument` when head_dim is not positive and even
/// or base is not finite and positive. Allocates nothing.
template <typename X, typename DerivedPositions>
void apply_rope_inplace(X&& x, const Eigen::MatrixBase<DerivedPositions>& positions, Eigen::Index head_dim,
                        Rope rope = {}) {
  detail::require_writable<X>();
  // Only the static_assert above speaks for a const or expression argument.
  if constexpr (detail::is_writable_matrix_v<X>) {
    detail::apply_rope_checked("attn::apply_rope_inplace", x, positions, head_dim, rope);
  }
}

/// As above, with the rows at consecutive positions first_position, first_position + 1, …:
/// the new keys and queries appended to a KV cache that already holds first_position tokens.
template <typename X>
void apply_rope_inplace(X&& x, Eigen::Index first_position, Eigen::Index head_dim, Rope rope = {}) {
  detail::require_writable<X>();
  // Only the static_assert above speaks for a const or expression argument.
  if constexpr (detail::is_writable_matrix_v<X>) {
    detail::apply_rope_checked("attn::apply_rope_inplace", x, first_position, head_dim, rope);
  }
}

/// `x` with RoPE applied, as a new matrix: the value-returning form of `apply_rope_inplace`,
/// with the same rules and errors.
template <typename Derived, typename DerivedPositions>
typename Derived::PlainObject apply_rope(const Eigen::MatrixBase<Derived>& x,
                                         const Eigen::MatrixBase<DerivedPositions>& positions, Eigen::Index head_dim,
                                         Rope rope = {}) {
  typename Derived::PlainObject rotated = x;
  detail::apply_rope_checked("attn::apply_rope", rotated, positions, head_dim, rope);
  return rotated;
}

/// `x` with RoPE applied, rows at consecutive positions from first_position, as a new matrix.
template <typename Derived>
typename Derived::PlainObject apply_rope(const Eigen::MatrixBase<Derived>& x, Eigen::Index first_position,
                                         Eigen::Index head_dim, Rope rope = {}) {
  typename Derived::PlainObject rotated = x;
  detail::apply_rope_checked("attn::apply_rope", rotated, first_position, head_dim, rope);
  return rotated;
}

}  // namespace attn
