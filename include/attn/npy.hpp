#pragma once
/// @file
/// Reading and writing NumPy's `.npy` files: float16, float32 and float64 matrices, so that
/// weights and reference outputs can move between attn and Python (`numpy.load`,
/// `numpy.save`).
///
/// What is read: format versions 1.0, 2.0 and 3.0; little-endian float16 (`'<f2'`, IEEE
/// binary16), float32 (`'<f4'`) and float64 (`'<f8'`), converted to the requested scalar
/// (`Eigen::half`, which is `attn::half`, float or double) as NumPy's `astype` converts:
/// exactly when widening, rounded once to nearest even when narrowing, except that a
/// finite value too large for the scalar is an error, not inf; 1-D and 2-D arrays, in C
/// order or Fortran order. A 1-D array of length n loads as an n×1 column, Eigen's own
/// orientation for a vector (it assigns to an `Eigen::VectorXd` as it is; `.transpose()`
/// gives a row). Anything else throws `attn::npy_error` naming the file and the reason.
///
/// What is written: version 1.0 (2.0 only if a header ever outgrew 64 KiB), the dtype of
/// the scalar (`'<f2'` for `Eigen::half`), always a 2-D shape (so an n×1 matrix is saved as
/// shape (n, 1), not (n,)), data in C order, and a header padded so that the data starts at
/// a multiple of 64 bytes: byte for byte what `numpy.save` writes for the same array. A
/// save replaces the file whole or not at all (see `save`).
///
/// The header is a Python dict literal. It is parsed by a small hand-written parser for
/// the restricted grammar NumPy writes, from a bounded string: every length is checked
/// before it is used, and no byte outside the input is ever read (fuzzed with libFuzzer,
/// tests/fuzz/). Reference: numpy/lib/format.py and NEP 1.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <ios>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

#include <Eigen/Core>

#include "error.hpp"

namespace attn {

/// A `.npy` file that attn cannot read or write: the message names the operation, the file
/// and the reason, e.g. `attn::npy::load: "w.npy": unsupported dtype '>f4' (...)`.
class npy_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace npy::detail {

/// `where` is the operation and the file, e.g. `attn::npy::load: "w.npy"`.
template <typename... Reason>
[[noreturn]] void fail(std::string_view where, const Reason&... reason) {
  attn::detail::raise<npy_error>(where, ": ", reason...);
}

/// Bytes from a file in an error message: quoted, shortened, non-printable bytes escaped,
/// so that a corrupt header cannot flood the message or the terminal.
inline std::string quote(std::string_view text, std::size_t max_length = 40) {
  std::string out = "'";
  for (std::size_t i = 0; i < text.size() && i < max_length; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte >= 0x20 && byte < 0x7f && byte != '\\') {
      out += static_cast<char>(byte);
    } else {
      constexpr const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[byte >> 4];
      out += hex[byte & 0xf];
    }
  }
  if (text.size() > max_length) out += "...";
  return out + "'";
}

/// The dtypes attn reads and writes: little-endian IEEE binary16, binary32 and binary64.
enum class Dtype { f2, f4, f8 };

/// What attn knows of a dtype, one row per `Dtype` in its order: the 'descr' NumPy writes,
/// the item size, NumPy's name (for messages about values in the file) and the C++ scalar
/// that holds it (for messages about the scalar being loaded).
struct DtypeInfo {
  Dtype dtype;
  const char* descr;
  std::size_t item_size;
  const char* numpy_name;
  const char* scalar_name;
};

inline constexpr DtypeInfo dtypes[] = {
    {Dtype::f2, "<f2", 2, "float16", "half"},
    {Dtype::f4, "<f4", 4, "float32", "float"},
    {Dtype::f8, "<f8", 8, "float64", "double"},
};

constexpr const DtypeInfo& dtype_info(Dtype dtype) noexcept { return dtypes[static_cast<std::size_t>(dtype)]; }
inline std::size_t item_size(Dtype dtype) noexcept { return dtype_info(dtype).item_size; }
inline const char* descr(Dtype dtype) noexcept { return dtype_info(dtype).descr; }

/// The dtype that stores `Scalar` (one of the scalars require_npy_scalar lets through).
template <typename Scalar>
constexpr Dtype dtype_of() noexcept {
  if constexpr (std::is_same_v<Scalar, Eigen::half>) {
    return Dtype::f2;
  } else if constexpr (std::is_same_v<Scalar, float>) {
    return Dtype::f4;
  } else {
    return Dtype::f8;
  }
}

/// A parsed and validated header. A 1-D shape (n,) is rows = n, cols = 1.
struct Header {
  Dtype dtype = Dtype::f8;
  bool fortran_order = false;
  int ndim = 0;
  Eigen::Index rows = 0;
  Eigen::Index cols = 0;
  std::size_t data_bytes = 0;  ///< rows·cols·item size, checked not to overflow
};

inline std::string shape_string(const Header& header) {
  if (header.ndim == 1) return attn::detail::message("(", header.rows, ",)");
  return attn::detail::message("(", header.rows, ", ", header.cols, ")");
}

/// The parser for the header dict, e.g. `{'descr': '<f8', 'fortran_order': False,
/// 'shape': (2, 3), }` followed by spaces and a newline: the three keys in any order, each
/// once, single- or double-quoted, with an optional trailing comma and Python's whitespace
/// anywhere between tokens. Nothing else of Python (no escapes, comments or expressions):
/// NumPy writes none, and a file that has them is not one attn should guess at.
class HeaderParser {
 public:
  /// `python2_longs`: whether a dimension may end in Python 2's long suffix, `2L`.
  HeaderParser(std::string_view text, std::string_view where, bool python2_longs)
      : text_(text), where_(where), python2_longs_(python2_longs) {}

  Header parse() {
    skip_whitespace();
    if (position_ == text_.size()) fail("the header is empty");
    if (!consume('{')) fail("the header is not a Python dict literal: it starts with ", rest());
    bool have_descr = false, have_fortran_order = false, have_shape = false;
    Header header;
    std::size_t shape_count = 0;
    std::string_view shape_dims[2];
    skip_whitespace();
    while (!consume('}')) {
      const std::size_t key_start = position_;
      const std::string_view key = parse_string("a key");
      skip_whitespace();
      if (!consume(':')) fail("expected ':' after the key ", quote(key), ", found ", rest());
      skip_whitespace();
      if (key == "descr") {
        mark_seen(have_descr, key, key_start);
        header.dtype = parse_dtype();
      } else if (key == "fortran_order") {
        mark_seen(have_fortran_order, key, key_start);
        header.fortran_order = parse_bool(key);
      } else if (key == "shape") {
        mark_seen(have_shape, key, key_start);
        shape_count = parse_shape(shape_dims);
      } else {
        position_ = key_start;
        fail("unexpected key ", quote(key), " in the header (a .npy header has exactly 'descr', "
             "'fortran_order' and 'shape')");
      }
      skip_whitespace();
      // Items are separated by commas, and a comma may also end the last one.
      if (consume(',')) {
        skip_whitespace();
      } else if (peek() != '}') {
        fail("expected ',' or '}' after the value of ", quote(key), ", found ", rest());
      }
    }
    skip_whitespace();
    if (position_ != text_.size()) fail("unexpected text after the header dict: ", rest());

    if (!have_descr) fail("the header has no 'descr' key");
    if (!have_fortran_order) fail("the header has no 'fortran_order' key");
    if (!have_shape) fail("the header has no 'shape' key");
    set_shape(header, shape_count, shape_dims);
    return header;
  }

 private:
  template <typename... Reason>
  [[noreturn]] void fail(const Reason&... reason) const {
    detail::fail(where_, "malformed header at byte ", position_, ": ", reason...);
  }

  /// What is left, for "found ..." in messages.
  std::string rest() const {
    if (position_ >= text_.size()) return "the end of the header";
    return quote(text_.substr(position_), 16);
  }

  /// The next byte, or '\0' at the end; '\0' is valid nowhere in the grammar, so a real
  /// '\0' in the header fails exactly as the end does.
  char peek() const noexcept { return position_ < text_.size() ? text_[position_] : '\0'; }

  bool consume(char expected) noexcept {
    if (position_ < text_.size() && text_[position_] == expected) {
      ++position_;
      return true;
    }
    return false;
  }

  void skip_whitespace() noexcept {
    while (position_ < text_.size()) {
      const char c = text_[position_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\f') break;
      ++position_;
    }
  }

  void mark_seen(bool& seen, std::string_view key, std::size_t key_start) {
    if (seen) {
      position_ = key_start;
      fail("the key ", quote(key), " appears twice");
    }
    seen = true;
  }

  /// 'text' or "text", without escapes.
  std::string_view parse_string(const char* what) {
    const char quote_char = peek();
    if (quote_char != '\'' && quote_char != '"') fail("expected ", what, " in quotes, found ", rest());
    const std::size_t start = ++position_;
    while (position_ < text_.size() && text_[position_] != quote_char) {
      const char c = text_[position_];
      if (c == '\\') fail("escape sequences in strings are not supported");
      if (c == '\n' || c == '\r') fail("a string runs past the end of its line");
      ++position_;
    }
    if (position_ >= text_.size()) fail("a string is not closed");
    const std::string_view contents = text_.substr(start, position_ - start);
    ++position_;  // the closing quote
    return contents;
  }

  Dtype parse_dtype() {
    if (peek() == '[') {
      fail("structured dtypes (a list of fields as 'descr') are not supported: attn reads float16 "
           "('<f2'), float32 ('<f4') and float64 ('<f8')");
    }
    const std::size_t start = position_;
    const std::string_view value = parse_string("the dtype ('descr')");
    for (const DtypeInfo& info : dtypes) {
      if (value == info.descr) return info.dtype;
    }
    position_ = start;  // report the error where the value starts
    if (!value.empty() && value[0] == '>') {
      // Big-endian: name the little-endian twin of a float dtype attn reads, as it keeps
      // every value and the size; float64 for anything else.
      const char* little_endian = "<f8";
      for (const DtypeInfo& info : dtypes) {
        if (value.substr(1) == info.descr + 1) little_endian = info.descr;
      }
      fail("unsupported dtype ", quote(value), ": ", supported_dtypes, "; convert big-endian data with arr.astype('",
           little_endian, "')");
    }
    fail("unsupported dtype ", quote(value), ": ", supported_dtypes);
  }

  static constexpr const char* supported_dtypes =
      "attn reads little-endian float16 ('<f2'), float32 ('<f4') and float64 ('<f8')";

  static bool is_identifier_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  }

  bool parse_bool(std::string_view key) {
    const std::size_t start = position_;
    while (position_ < text_.size() && is_identifier_char(text_[position_])) ++position_;
    const std::string_view word = text_.substr(start, position_ - start);
    if (word == "True") return true;
    if (word == "False") return false;
    position_ = start;
    fail(quote(key), " must be True or False, found ", rest());
  }

  /// A tuple of non-negative integers: `()`, `(n,)`, `(r, c)`, `(r, c,)`, … Returns the
  /// number of dimensions and keeps the digits of the first two; `(n)` is an integer in
  /// Python, not a tuple, and is refused as NumPy refuses it.
  std::size_t parse_shape(std::string_view (&dims)[2]) {
    if (!consume('(')) fail("'shape' must be a tuple of integers such as (2, 3), found ", rest());
    std::size_t count = 0;
    bool trailing_comma = false;
    skip_whitespace();
    while (!consume(')')) {
      const std::string_view digits = parse_dimension();
      if (count < 2) dims[count] = digits;
      ++count;
      skip_whitespace();
      trailing_comma = consume(',');
      skip_whitespace();
      if (!trailing_comma && peek() != ')') fail("expected ',' or ')' in 'shape', found ", rest());
    }
    if (count == 1 && !trailing_comma) fail("'shape' is an integer in parentheses, not a tuple (write (n,))");
    return count;
  }

  static bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

  /// A dimension's decimal digits, syntax checked; their value is checked by set_shape.
  std::string_view parse_dimension() {
    const std::size_t start = position_;
    const bool negative = consume('-');
    const std::size_t digits_start = position_;
    while (is_digit(peek())) ++position_;
    const std::string_view digits = text_.substr(digits_start, position_ - digits_start);
    if (negative && !digits.empty()) {
      position_ = start;
      fail("'shape' has a negative dimension ", quote(text_.substr(start, digits.size() + 1)));
    }
    if (negative || digits.empty()) {
      position_ = start;
      fail("'shape' must hold non-negative integers, found ", rest());
    }
    // Python 3 has no integer literal with a leading zero other than 0 itself (00 is 0),
    // so NumPy refuses one; Python 2 read 010 as octal 8, and taking it as 10 would be a
    // third reading.
    if (digits[0] == '0' && digits.find_first_not_of('0') != std::string_view::npos) {
      position_ = digits_start;
      fail("'shape' has a dimension with a leading zero ", quote(digits), " (Python 3 and NumPy read no such integer)");
    }
    // Python 2 wrote long integers as 2L, and NumPy under Python 2 wrote such shapes. NumPy
    // drops the L (a token of its own, so spaces may come before it) from the versions that
    // Python 2 wrote, 1.0 and 2.0, and nowhere else.
    const std::size_t after_digits = position_;
    skip_whitespace();
    if (peek() == 'L') {
      if (!python2_longs_) {
        fail("'shape' has Python 2's long suffix 'L', which NumPy reads only in format versions 1.0 and 2.0");
      }
      ++position_;
    } else {
      position_ = after_digits;
    }
    return digits;
  }

  /// Whether `digits` is an integer in [0, limit]; stores it in `value` if so. No
  /// arithmetic overflows: each step is checked against the limit first.
  static bool parse_at_most(std::string_view digits, std::uint64_t limit, std::uint64_t& value) noexcept {
    value = 0;
    for (const char c : digits) {
      const auto digit = static_cast<std::uint64_t>(c - '0');
      if (digit > limit || value > (limit - digit) / 10) return false;
      value = value * 10 + digit;
    }
    return true;
  }

  void set_shape(Header& header, std::size_t count, const std::string_view (&dims)[2]) const {
    if (count == 0) detail::fail(where_, "0-D arrays (shape ()) are not supported: attn reads 1-D and 2-D arrays");
    if (count > 2) {
      detail::fail(where_, count, "-D arrays are not supported: attn reads 1-D and 2-D arrays");
    }
    header.ndim = static_cast<int>(count);
    // Element counts and byte sizes must fit both std::size_t and Eigen::Index.
    const std::uint64_t max_bytes =
        std::min<std::uint64_t>(std::numeric_limits<std::size_t>::max(),
                                static_cast<std::uint64_t>(std::numeric_limits<Eigen::Index>::max()));
    const std::uint64_t max_elements = max_bytes / item_size(header.dtype);
    std::uint64_t extents[2] = {0, 1};  // a 1-D (n,) is n x 1
    for (std::size_t i = 0; i < count; ++i) {
      if (!parse_at_most(dims[i], max_elements, extents[i])) {
        detail::fail(where_, "'shape' has a dimension too large for memory: ", quote(dims[i]));
      }
    }
    header.rows = static_cast<Eigen::Index>(extents[0]);
    header.cols = static_cast<Eigen::Index>(extents[1]);
    if (extents[1] != 0 && extents[0] > max_elements / extents[1]) {
      detail::fail(where_, "'shape' ", shape_string(header), " has more elements than fit in memory");
    }
    header.data_bytes = static_cast<std::size_t>(extents[0] * extents[1] * item_size(header.dtype));
  }

  std::string_view text_;
  std::string_view where_;
  bool python2_longs_;
  std::size_t position_ = 0;
};

/// Parses and validates a header dict (the text between the length field and the data) of
/// a file of format version `major_version`.0. Throws npy_error, with `where` in front of
/// the reason, for anything attn does not read.
inline Header parse_header(std::string_view text, std::string_view where = "attn::npy::detail::parse_header",
                           int major_version = 1) {
  return HeaderParser(text, where, major_version <= 2).parse();
}

inline constexpr std::string_view magic{"\x93NUMPY", 6};

/// Where the header is, from the first bytes of a file.
struct Prefix {
  int major = 0;
  int minor = 0;
  std::size_t header_offset = 0;  ///< 10 for version 1.0, 12 for 2.0 and 3.0
  std::size_t header_length = 0;
};

[[noreturn]] inline void fail_truncated_prefix(std::size_t file_size, std::size_t needed, std::string_view where) {
  fail(where, "truncated: the file has ", file_size, " bytes, but the .npy prefix needs ", needed);
}

/// Reads the magic string, the version and the header length from `first_bytes`, the
/// first up-to-12 bytes of a file of `file_size` bytes (fewer only if the file is shorter).
inline Prefix parse_prefix(std::string_view first_bytes, std::size_t file_size, std::string_view where) {
  const std::size_t compared = std::min(first_bytes.size(), magic.size());
  if (first_bytes.substr(0, compared) != magic.substr(0, compared)) {
    fail(where, "not a .npy file: it does not start with \"\\x93NUMPY\" (it starts with ",
         quote(first_bytes.substr(0, 8)), ")");
  }
  if (first_bytes.size() < magic.size() + 2) fail_truncated_prefix(file_size, magic.size() + 2, where);
  Prefix prefix;
  prefix.major = static_cast<unsigned char>(first_bytes[6]);
  prefix.minor = static_cast<unsigned char>(first_bytes[7]);
  std::size_t length_bytes = 0;
  if (prefix.major == 1 && prefix.minor == 0) {
    length_bytes = 2;
  } else if ((prefix.major == 2 || prefix.major == 3) && prefix.minor == 0) {
    length_bytes = 4;  // 3.0 differs from 2.0 only in allowing UTF-8 in the header
  } else {
    fail(where, "unsupported .npy format version ", prefix.major, ".", prefix.minor, " (attn reads 1.0, 2.0 and 3.0)");
  }
  prefix.header_offset = magic.size() + 2 + length_bytes;
  if (first_bytes.size() < prefix.header_offset) fail_truncated_prefix(file_size, prefix.header_offset, where);
  // Little-endian, assembled byte by byte: the host's byte order does not matter.
  for (std::size_t i = length_bytes; i-- > 0;) {
    prefix.header_length = (prefix.header_length << 8) | static_cast<unsigned char>(first_bytes[8 + i]);
  }
  if (prefix.header_length > file_size - prefix.header_offset) {
    fail(where, "the header length ", prefix.header_length, " runs past the end of the file (",
         file_size - prefix.header_offset, " bytes after the prefix)");
  }
  return prefix;
}

/// The data must be exactly what the shape says: less is a truncated file, more is a
/// header that does not describe the data.
inline void require_data_length(const Header& header, std::size_t available, std::string_view where) {
  if (available != header.data_bytes) {
    fail(where, available < header.data_bytes ? "truncated data" : "data length does not match the shape", ": shape ",
         shape_string(header), " of ", descr(header.dtype), " needs ", header.data_bytes, " bytes, the file has ",
         available);
  }
}

inline bool host_is_little_endian() noexcept {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

/// .npy data is little-endian; on a big-endian host each item's bytes are reversed.
inline void reverse_item_bytes(void* data, std::size_t count, std::size_t item_bytes) noexcept {
  auto* bytes = static_cast<unsigned char*>(data);
  for (std::size_t i = 0; i < count; ++i) std::reverse(bytes + i * item_bytes, bytes + (i + 1) * item_bytes);
}

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

template <typename Scalar>
constexpr void require_npy_scalar() noexcept {
  static_assert(std::is_same_v<Scalar, Eigen::half> || std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "attn::npy reads and writes half ('<f2'), float ('<f4') and double ('<f8') matrices; convert "
                "others with .cast<float>() or .cast<double>()");
}

/// `value` in the fewest significant digits that read back as the same double, so that a
/// message shows 1e+300 rather than 1.0000000000000001e+300, and a value just past a limit
/// is not printed as the limit. An integer of up to 9 digits is written out (half's limit
/// reads 65520, not 6.552e+04).
inline std::string shortest_decimal(double value) {
  char text[32];
  if (std::abs(value) < 1e9 && value == std::trunc(value)) {
    std::snprintf(text, sizeof text, "%.0f", value);
    return text;
  }
  for (int digits = 1;; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, value);
    if (digits >= std::numeric_limits<double>::max_digits10 || std::strtod(text, nullptr) == value) return text;
  }
}

/// The smallest magnitude that rounding to nearest takes to inf in `Target` (float or
/// half): its largest finite value plus half its last place (float: 2^128 - 2^104 + 2^103;
/// half: 65504 + 16 = 65520). Everything below it rounds to a finite value.
template <typename Target>
double overflow_threshold() noexcept {
  using limits = std::numeric_limits<Target>;
  return static_cast<double>(static_cast<float>((limits::max)())) +
         std::ldexp(1.0, limits::max_exponent - limits::digits - 1);
}

/// Data loaded into a narrower scalar (float64 as float or half, float32 as half): a finite
/// value too large for it would become inf, a wrong number with no sign of trouble, so the
/// first one in the file's order is refused with its index in the array. Values that round
/// to the scalar's largest finite value load as it, and inf and NaN stored in the file load
/// as themselves.
template <typename Target, typename FileScalar, int Order>
void require_in_range(const Eigen::Matrix<FileScalar, Eigen::Dynamic, Eigen::Dynamic, Order>& data,
                      const Header& header, std::string_view where) {
  const double overflows_at = overflow_threshold<Target>();
  const FileScalar* values = data.data();
  for (Eigen::Index i = 0; i < data.size(); ++i) {
    const auto value = static_cast<double>(values[i]);  // exact: FileScalar is float or double
    // NaN fails the comparison, and an inf in the file is no overflow: both load as they are.
    if (!(std::abs(value) >= overflows_at) || std::isinf(value)) continue;
    const Eigen::Index row = Order == Eigen::RowMajor ? i / data.cols() : i % data.rows();
    const Eigen::Index col = Order == Eigen::RowMajor ? i % data.cols() : i / data.rows();
    const std::string index = header.ndim == 1 ? attn::detail::message("[", row, "]")
                                               : attn::detail::message("[", row, ", ", col, "]");
    const DtypeInfo& file = dtype_info(header.dtype);
    fail(where, "the ", file.numpy_name, " value ", shortest_decimal(value), " at ", index, " is too large for ",
         dtype_info(dtype_of<Target>()).scalar_name, " (it would load as inf): load the file as ", file.scalar_name);
  }
}

/// A float64 value as half, rounded once to nearest even, as NumPy's astype('<f2') rounds.
/// Eigen's half(double) goes through float and so rounds twice, which is wrong when the
/// first rounding lands on a midpoint between two halves: 1 + 2^-11 + 2^-30 becomes the
/// float 1 + 2^-11, which ties to even, 1, though it is nearer 1 + 2^-10; 65520 - 2^-20
/// becomes inf instead of 65504. Rounding to float toward zero and setting the last bit
/// when that is inexact ("round to odd") keeps what the second rounding needs, as float
/// has 13 more bits than half everywhere in half's range (Boldo and Melquiond, "When
/// double rounding is odd", 2005).
inline Eigen::half double_to_half(double value) noexcept {
  float narrowed = static_cast<float>(value);
  if (std::isfinite(value) && static_cast<double>(narrowed) != value) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &narrowed, sizeof bits);
    // One step toward zero if rounding went away from it: the sign bit is untouched, and
    // inf steps to float's largest finite value.
    if (std::abs(static_cast<double>(narrowed)) > std::abs(value)) --bits;
    bits |= 1u;
    std::memcpy(&narrowed, &bits, sizeof bits);
  }
  return Eigen::half(narrowed);
}

/// Fills a matrix of the file's scalar and storage order with `read(destination, bytes)`,
/// which must deliver exactly `bytes` bytes, then converts it to a column-major `Scalar`.
template <typename Scalar, typename FileScalar, int Order, typename ReadBytes>
Matrix<Scalar> read_data_as(const Header& header, ReadBytes& read, std::string_view where) {
  Eigen::Matrix<FileScalar, Eigen::Dynamic, Eigen::Dynamic, Order> data(header.rows, header.cols);
  if (header.data_bytes == 0) return Matrix<Scalar>(header.rows, header.cols);
  read(data.data(), header.data_bytes);
  if (!host_is_little_endian()) reverse_item_bytes(data.data(), static_cast<std::size_t>(data.size()), sizeof(FileScalar));
  if constexpr (std::is_same_v<Scalar, FileScalar> && Order == Eigen::ColMajor) {
    return data;  // Fortran order in the requested scalar: no copy
  } else {
    // half to float or double, and float to double, are exact; the other way needs a check.
    if constexpr (std::numeric_limits<Scalar>::max_exponent < std::numeric_limits<FileScalar>::max_exponent) {
      require_in_range<Scalar>(data, header, where);
    }
    if constexpr (std::is_same_v<Scalar, Eigen::half> && std::is_same_v<FileScalar, double>) {
      return data.unaryExpr([](double value) { return double_to_half(value); });
    } else {
      return data.template cast<Scalar>();  // widening is exact; float to half rounds once, to nearest even
    }
  }
}

/// `read_data_as` in the file's storage order: Fortran order is Eigen's column-major, C
/// order its row-major; a 1-D array is both.
template <typename Scalar, typename FileScalar, typename ReadBytes>
Matrix<Scalar> read_data_in_order(const Header& header, ReadBytes& read, std::string_view where) {
  return header.fortran_order ? read_data_as<Scalar, FileScalar, Eigen::ColMajor>(header, read, where)
                              : read_data_as<Scalar, FileScalar, Eigen::RowMajor>(header, read, where);
}

template <typename Scalar, typename ReadBytes>
Matrix<Scalar> read_data(const Header& header, ReadBytes&& read, std::string_view where) {
  switch (header.dtype) {
    case Dtype::f2:
      return read_data_in_order<Scalar, Eigen::half>(header, read, where);
    case Dtype::f4:
      return read_data_in_order<Scalar, float>(header, read, where);
    case Dtype::f8:
      break;
  }
  return read_data_in_order<Scalar, double>(header, read, where);
}

/// The header dict NumPy writes for a C-order 2-D array, keys sorted, with the spaces
/// NumPy leaves so that the first dimension can grow to 21 digits in place.
inline std::string header_dict(Dtype dtype, Eigen::Index rows, Eigen::Index cols) {
  const std::string rows_text = std::to_string(rows);
  std::string dict = std::string("{'descr': '") + descr(dtype) + "', 'fortran_order': False, 'shape': (" + rows_text +
                     ", " + std::to_string(cols) + "), }";
  constexpr std::size_t growth_axis_max_digits = 21;
  if (rows_text.size() < growth_axis_max_digits) dict.append(growth_axis_max_digits - rows_text.size(), ' ');
  return dict;
}

/// The magic string, version, length and padded dict, as NumPy frames them: spaces and a
/// final '\n' bring the data to a multiple of 64 bytes (so that it can be memory-mapped
/// aligned). Version 1.0 stores the length in 2 bytes; a longer header needs 2.0.
inline std::string frame_header(const std::string& dict) {
  constexpr std::size_t alignment = 64;
  const auto frame = [&](int major, std::size_t length_bytes) {
    const std::size_t prefix_size = magic.size() + 2 + length_bytes;
    const std::size_t padding = alignment - (prefix_size + dict.size() + 1) % alignment;
    const std::size_t header_length = dict.size() + padding + 1;
    std::string out(magic);
    out += static_cast<char>(major);
    out += '\0';
    for (std::size_t i = 0; i < length_bytes; ++i) out += static_cast<char>((header_length >> (8 * i)) & 0xff);
    out += dict;
    out.append(padding, ' ');
    out += '\n';
    return out;
  };
  std::string framed = frame(1, 2);
  if (framed.size() - 10 > 0xffff) framed = frame(2, 4);
  return framed;
}

/// Writes `matrix` as a .npy file through `write(bytes, count)`: the header, then the data
/// in C order, a chunk of rows at a time (about 64 KiB), so that a column-major matrix
/// needs a small buffer rather than a transposed copy.
template <typename Derived, typename WriteBytes>
void write_npy(const Eigen::MatrixBase<Derived>& matrix, WriteBytes&& write) {
  using Scalar = typename Derived::Scalar;
  require_npy_scalar<Scalar>();
  const std::string header = frame_header(header_dict(dtype_of<Scalar>(), matrix.rows(), matrix.cols()));
  write(header.data(), header.size());
  if (matrix.size() == 0) return;
  const auto write_rows = [&](const auto& source) {
    const Eigen::Index chunk_rows = std::max<Eigen::Index>(1, static_cast<Eigen::Index>(64 * 1024 / sizeof(Scalar)) / source.cols());
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> chunk;
    for (Eigen::Index row = 0; row < source.rows(); row += chunk_rows) {
      chunk = source.middleRows(row, std::min(chunk_rows, source.rows() - row));
      if (!host_is_little_endian()) reverse_item_bytes(chunk.data(), static_cast<std::size_t>(chunk.size()), sizeof(Scalar));
      write(chunk.data(), static_cast<std::size_t>(chunk.size()) * sizeof(Scalar));
    }
  };
  // A view (matrix, block, Map) is read in place; an expression such as a product is
  // evaluated once, not once per chunk.
  if constexpr ((Derived::Flags & Eigen::DirectAccessBit) != 0) {
    write_rows(matrix.derived());
  } else {
    write_rows(matrix.eval());
  }
}

/// Parses what `bytes` (a whole .npy file) holds and returns the matrix in it.
template <typename Scalar>
Matrix<Scalar> load_bytes(std::string_view bytes, std::string_view where) {
  const Prefix prefix = parse_prefix(bytes.substr(0, 12), bytes.size(), where);
  const Header header = parse_header(bytes.substr(prefix.header_offset, prefix.header_length), where, prefix.major);
  const std::string_view data = bytes.substr(prefix.header_offset + prefix.header_length);
  require_data_length(header, data.size(), where);
  return read_data<Scalar>(
      header, [&](void* destination, std::size_t count) { std::memcpy(destination, data.data(), count); }, where);
}

inline std::string system_reason() {
  return errno != 0 ? ": " + std::generic_category().message(errno) : std::string();
}

/// Writes the file at `path` directly, as a device or a pipe must be written.
template <typename Derived>
void write_in_place(const std::filesystem::path& path, const Eigen::MatrixBase<Derived>& matrix, std::string_view where) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(where, "cannot open for writing", system_reason());
  write_npy(matrix, [&](const void* bytes, std::size_t count) {
    out.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(count));
  });
  out.close();
  // Checked once at the end: a failed write sets the stream's state, which stays set.
  if (!out) fail(where, "write failed", system_reason());
}

/// Creates `path` for writing, failing if anything of that name exists (C11's "x" mode,
/// which C++17 includes): two saves never write one temporary file.
inline std::FILE* create_new_file(const std::filesystem::path& path) {
#if defined(_WIN32)
  return _wfopen(path.c_str(), L"wbx");  // the path is UTF-16 there: fopen would lose characters
#else
  return std::fopen(path.c_str(), "wbx");
#endif
}

/// The new file that `save` writes beside the target and renames over it once complete.
/// Destroyed before that (a failed write, an exception from evaluating the matrix), it is
/// closed and removed.
class TemporaryFile {
 public:
  TemporaryFile(const std::filesystem::path& target, std::string_view where) : where_(where) {
    // Beside the target, as a rename is atomic only within one file system. The name is
    // hidden and says what it was for; a counter makes it unique in this process and the
    // clock across processes, and exclusive creation makes a clash another try, never two
    // writers of one file.
    static std::atomic<unsigned long> counter{0};
    const auto now = static_cast<unsigned long long>(std::chrono::system_clock::now().time_since_epoch().count());
    for (int attempt = 0; attempt < 100; ++attempt) {
      // Built as a path, not a std::string, so that the name keeps the path's own encoding.
      std::filesystem::path name = ".";
      name += target.filename();
      name += ".attn-tmp-" + std::to_string(now) + "-" + std::to_string(counter++);
      path_ = target;
      path_.replace_filename(name);
      errno = 0;
      file_ = create_new_file(path_);
      if (file_ != nullptr || errno != EEXIST) break;
    }
    if (file_ == nullptr) {
      fail(where_, "cannot open for writing: cannot create the temporary file \"", path_.string(), "\"",
           system_reason());
    }
  }

  ~TemporaryFile() {
    if (file_ != nullptr) std::fclose(file_);
    if (!replaced_) {
      std::error_code ignored;
      std::filesystem::remove(path_, ignored);
    }
  }

  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;

  const std::filesystem::path& path() const noexcept { return path_; }

  void write(const void* bytes, std::size_t count) {
    errno = 0;
    if (std::fwrite(bytes, 1, count, file_) != count) fail(where_, "write failed", system_reason());
  }

  /// Flushes and closes the file, then renames it over `target`: each step can be the one
  /// that finds the disk full, so each is checked before the old file is given up.
  void replace(const std::filesystem::path& target) {
    errno = 0;
    if (std::fflush(file_) != 0) fail(where_, "write failed", system_reason());
    std::FILE* const file = file_;
    file_ = nullptr;  // closed even if fclose fails
    errno = 0;
    if (std::fclose(file) != 0) fail(where_, "write failed", system_reason());
    std::error_code error;
    std::filesystem::rename(path_, target, error);
    if (error) fail(where_, "cannot replace the file with the temporary \"", path_.string(), "\": ", error.message());
    replaced_ = true;
  }

 private:
  std::string where_;
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
  bool replaced_ = false;
};

}  // namespace npy::detail

namespace npy {

/// Loads a float16, float32 or float64 .npy file as a column-major `Scalar` matrix
/// (`Eigen::half`, float or double), converting the values if the file's dtype is another
/// one: exactly to a wider scalar, rounded once to nearest even to a narrower one, as
/// NumPy's `astype` does. A 1-D array of length n is an n×1 column. Throws attn::npy_error
/// (with the path and the reason) for a file that cannot be opened, is truncated, corrupt,
/// or holds anything else (another dtype, big-endian data, 0-D or 3-D and higher shapes),
/// and for data loaded into a narrower scalar (float64 as float or half, float32 as half)
/// that holds a finite value too large for it (naming the first one and its index).
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> load(const std::filesystem::path& path) {
  detail::require_npy_scalar<Scalar>();
  const std::string where = "attn::npy::load: \"" + path.string() + "\"";
  // The size bounds every length read from the file, so check it is a file with one.
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (status.type() == std::filesystem::file_type::not_found) detail::fail(where, "cannot open: no such file");
  if (error) detail::fail(where, "cannot open: ", error.message());
  if (std::filesystem::is_directory(status)) detail::fail(where, "cannot open: it is a directory");
  if (!std::filesystem::is_regular_file(status)) detail::fail(where, "cannot open: it is not a regular file");
  const std::uintmax_t size = std::filesystem::file_size(path, error);
  if (error) detail::fail(where, "cannot open: ", error.message());
  if constexpr (sizeof(std::uintmax_t) > sizeof(std::size_t)) {
    if (size > std::numeric_limits<std::size_t>::max()) detail::fail(where, "the file is too large for this platform");
  }
  const auto file_size = static_cast<std::size_t>(size);

  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail(where, "cannot open for reading", detail::system_reason());
  const auto read = [&](void* destination, std::size_t count) {
    in.read(static_cast<char*>(destination), static_cast<std::streamsize>(count));
    if (in.gcount() != static_cast<std::streamsize>(count)) {
      detail::fail(where, "read failed (did the file change while being read?)");
    }
  };

  std::string first_bytes(std::min<std::size_t>(file_size, 12), '\0');
  read(first_bytes.data(), first_bytes.size());
  const detail::Prefix prefix = detail::parse_prefix(first_bytes, file_size, where);
  std::string header_text(prefix.header_length, '\0');
  in.seekg(static_cast<std::streamoff>(prefix.header_offset));
  read(header_text.data(), header_text.size());
  const detail::Header header = detail::parse_header(header_text, where, prefix.major);
  detail::require_data_length(header, file_size - prefix.header_offset - prefix.header_length, where);
  return detail::read_data<Scalar>(header, read, where);
}

/// `load` for a whole .npy file already in memory.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> load_from_memory(std::string_view bytes) {
  detail::require_npy_scalar<Scalar>();
  return detail::load_bytes<Scalar>(bytes, "attn::npy::load_from_memory");
}

/// Saves a half (`'<f2'`), float (`'<f4'`) or double (`'<f8'`) matrix (any Eigen
/// expression: a block, a Map, a row-major matrix, a product) as a .npy file that
/// `numpy.load` reads with the same shape, always 2-D. The file is written whole or not at
/// all: the data goes to a new file beside it, which replaces it only once complete, so a
/// save that fails (a full disk, a file-size limit, an exception) leaves an existing file
/// as it was and no temporary file behind. A symbolic link is followed (the file it names
/// is replaced, the link kept), and an existing file's permissions are kept. A device or
/// pipe (`/dev/stdout`) is written in place. Throws attn::npy_error if the file cannot be
/// created, written or replaced.
template <typename Derived>
void save(const std::filesystem::path& path, const Eigen::MatrixBase<Derived>& matrix) {
  detail::require_npy_scalar<typename Derived::Scalar>();
  namespace fs = std::filesystem;
  const std::string where = "attn::npy::save: \"" + path.string() + "\"";
  std::error_code error;
  // Writing to a link writes the file it names; replacing the link by a file would not.
  fs::path target = path;
  if (fs::is_symlink(fs::symlink_status(path, error))) {
    target = fs::weakly_canonical(path, error);
    if (error) detail::fail(where, "cannot open for writing: cannot resolve the symbolic link: ", error.message());
  }
  const fs::file_status status = fs::status(target, error);
  const bool exists = fs::exists(status);
  if (exists && fs::is_directory(status)) detail::fail(where, "cannot open for writing: it is a directory");
  if (exists && !fs::is_regular_file(status)) {
    // A device or a pipe holds no old contents to keep, and must not be renamed over.
    detail::write_in_place(target, matrix, where);
    return;
  }
  detail::TemporaryFile temporary(target, where);
  // Before any data: a file the owner alone may read must not be readable by others, even
  // while it is being written. A file system without permissions refuses to set them, and
  // then there is nothing to keep, so a failure here does not fail the save.
  if (exists) fs::permissions(temporary.path(), status.permissions(), error);
  detail::write_npy(matrix, [&](const void* bytes, std::size_t count) { temporary.write(bytes, count); });
  temporary.replace(target);
}

}  // namespace npy
}  // namespace attn
