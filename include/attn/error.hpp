#pragma once
/// @file
/// The exceptions attn throws, and the checks that throw them.
///
/// Checks on dynamic sizes stay on in release builds: each costs O(1) per call, and the
/// message is only formatted on the cold path that throws.

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include <Eigen/Core>

namespace attn {

/// Two operands whose sizes cannot work together, detected at run time. The message names
/// the operation, the operands and both shapes, e.g.
/// `attn::scaled_scores: q has 4 columns but k has 3 (q is 2x4, k is 5x3)`.
class dimension_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

enum class Extent { rows, columns };

inline const char* extent_name(Extent extent) noexcept {
  return extent == Extent::rows ? "rows" : "columns";
}

inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

/// An operand as the error messages describe it: its name and its shape.
struct Operand {
  const char* name;
  Eigen::Index rows;
  Eigen::Index cols;

  Eigen::Index extent(Extent which) const noexcept { return which == Extent::rows ? rows : cols; }
};

template <typename Derived>
Operand operand(const char* name, const Eigen::DenseBase<Derived>& matrix) noexcept {
  return {name, matrix.rows(), matrix.cols()};
}

[[noreturn]] inline void throw_dimension_error(const std::string& message) {
  throw dimension_error(message);
}

[[noreturn]] inline void throw_invalid_argument(const std::string& message) {
  throw std::invalid_argument(message);
}

[[noreturn]] inline void throw_extent_mismatch(const char* operation, const Operand& a, Extent extent_a,
                                               const Operand& b, Extent extent_b) {
  std::string message = std::string(operation) + ": " + a.name + " has " +
                        std::to_string(a.extent(extent_a)) + " " + extent_name(extent_a) + " but " +
                        b.name + " has " + std::to_string(b.extent(extent_b));
  if (extent_b != extent_a) message += std::string(" ") + extent_name(extent_b);
  message += std::string(" (") + a.name + " is " + shape_string(a.rows, a.cols) + ", " + b.name +
             " is " + shape_string(b.rows, b.cols) + ")";
  throw_dimension_error(message);
}

/// Throws unless `a`'s `extent_a` equals `b`'s `extent_b`.
inline void require_extents_match(const char* operation, const Operand& a, Extent extent_a,
                                  const Operand& b, Extent extent_b) {
  if (a.extent(extent_a) != b.extent(extent_b)) throw_extent_mismatch(operation, a, extent_a, b, extent_b);
}

/// Throws unless `a` is exactly `rows`×`cols`; `expected` says where those numbers come from.
inline void require_shape(const char* operation, const Operand& a, Eigen::Index rows, Eigen::Index cols,
                          const char* expected) {
  if (a.rows != rows || a.cols != cols) {
    throw_dimension_error(std::string(operation) + ": " + a.name + " is " + shape_string(a.rows, a.cols) +
                          " but must be " + expected + " = " + shape_string(rows, cols));
  }
}

/// Compile-time counterpart of the checks above: two extents are compatible unless both
/// are known at compile time and differ (so `Eigen::Dynamic` always passes).
constexpr bool extents_compatible(int a, int b) noexcept {
  return a == Eigen::Dynamic || b == Eigen::Dynamic || a == b;
}

template <typename Scalar>
void require_valid_scale(const char* operation, Scalar scale) {
  if (!(std::isfinite(scale) && scale > Scalar(0))) {
    std::ostringstream message;
    message << operation << ": scale must be finite and positive, got " << scale;
    throw_invalid_argument(message.str());
  }
}

}  // namespace detail
}  // namespace attn
