#pragma once
/// @file
/// The exceptions attn throws, the one way their messages are built, and the checks that
/// throw them.
///
/// Checks on dynamic sizes stay on in release builds: each costs O(1) per call, and the
/// message is only formatted on the cold path that throws.

#include <cmath>
#include <locale>
#include <ostream>
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

/// Appending more tokens than a `KVCache` with `CacheOverflow::throw_error` can hold; the
/// cache is left as it was.
class capacity_error : public std::length_error {
 public:
  using std::length_error::length_error;
};

// Also thrown: `std::invalid_argument` for other bad arguments (a non-finite scale,
// num_heads not dividing embed_dim), with the values in the message; `std::out_of_range`
// for a KV cache layer that does not exist; and `attn::npy_error` (a `std::runtime_error`,
// in npy.hpp, beside the file I/O that alone throws it) for a .npy file that cannot be read
// or written.

namespace detail {

/// A matrix shape as messages print it: `RxC`.
struct Shape {
  Eigen::Index rows;
  Eigen::Index cols;
};

inline std::ostream& operator<<(std::ostream& out, Shape shape) { return out << shape.rows << 'x' << shape.cols; }

/// The one way attn builds an error message: its parts streamed in order (names, numbers,
/// `Shape`s). Only the cold path that throws pays for it.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  out.imbue(std::locale::classic());  // "1024", whatever the program's global locale groups
  (out << ... << parts);
  return out.str();
}

/// Throws an `Error` whose message is `parts` (see `message`).
template <typename Error, typename... Parts>
[[noreturn]] void raise(const Parts&... parts) {
  throw Error(message(parts...));
}

enum class Extent { rows, columns };

inline const char* extent_name(Extent extent) noexcept {
  return extent == Extent::rows ? "rows" : "columns";
}

/// An operand as the error messages describe it: its name and its shape.
struct Operand {
  const char* name;
  Eigen::Index rows;
  Eigen::Index cols;

  Eigen::Index extent(Extent which) const noexcept { return which == Extent::rows ? rows : cols; }
  Shape shape() const noexcept { return {rows, cols}; }
};

template <typename Derived>
Operand operand(const char* name, const Eigen::DenseBase<Derived>& matrix) noexcept {
  return {name, matrix.rows(), matrix.cols()};
}

/// `operation: operand is RxC but must be …`: every message about one operand's shape.
template <typename... Requirement>
[[noreturn]] void raise_shape(const char* operation, const Operand& a, const Requirement&... requirement) {
  raise<dimension_error>(operation, ": ", a.name, " is ", a.shape(), " but must be ", requirement...);
}

[[noreturn]] inline void throw_extent_mismatch(const char* operation, const Operand& a, Extent extent_a,
                                               const Operand& b, Extent extent_b) {
  raise<dimension_error>(operation, ": ", a.name, " has ", a.extent(extent_a), " ", extent_name(extent_a), " but ",
                         b.name, " has ", b.extent(extent_b), extent_b != extent_a ? " " : "",
                         extent_b != extent_a ? extent_name(extent_b) : "", " (", a.name, " is ", a.shape(), ", ",
                         b.name, " is ", b.shape(), ")");
}

/// Throws unless `a`'s `extent_a` equals `b`'s `extent_b`.
inline void require_extents_match(const char* operation, const Operand& a, Extent extent_a,
                                  const Operand& b, Extent extent_b) {
  if (a.extent(extent_a) != b.extent(extent_b)) throw_extent_mismatch(operation, a, extent_a, b, extent_b);
}

/// Throws unless `a` is exactly `rows`×`cols`; `expected` says where those numbers come from.
inline void require_shape(const char* operation, const Operand& a, Eigen::Index rows, Eigen::Index cols,
                          const char* expected) {
  if (a.rows != rows || a.cols != cols) raise_shape(operation, a, expected, " = ", Shape{rows, cols});
}

/// Compile-time counterpart of the checks above: two extents are compatible unless both
/// are known at compile time and differ (so `Eigen::Dynamic` always passes).
constexpr bool extents_compatible(int a, int b) noexcept {
  return a == Eigen::Dynamic || b == Eigen::Dynamic || a == b;
}

template <typename Scalar>
void require_valid_scale(const char* operation, Scalar scale) {
  if (!(std::isfinite(scale) && scale > Scalar(0))) {
    raise<std::invalid_argument>(operation, ": scale must be finite and positive, got ", scale);
  }
}

}  // namespace detail
}  // namespace attn
