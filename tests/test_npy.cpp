// NumPy .npy files: fixtures written by NumPy itself (tests/fixtures/npy/, made by
// make_fixtures.py), round trips through every kind of Eigen input, and every way a file
// can be wrong, each with its message.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <csignal>
#include <sys/resource.h>
#define ATTN_TEST_HAVE_RLIMIT 1
#endif

#include <attn/npy.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using attn_test::ContainsSubstring;
using attn_test::Matrix;
using attn_test::RowMajorMatrix;
using Eigen::Index;
namespace fs = std::filesystem;

namespace {

// The fixtures sit next to this file; __FILE__ is the absolute path CMake compiles, so the
// test finds them from any build directory without a configure-time definition.
fs::path fixture(const char* name) { return fs::path(__FILE__).parent_path() / "fixtures" / "npy" / name; }

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// A directory of its own under the system's temporary directory, removed afterwards. The
/// random suffix keeps two runs of the suite (a test and a sanitize build, say) apart.
class TempDir {
 public:
  explicit TempDir(const std::string& name) {
    std::random_device random;
    path_ = fs::temp_directory_path() / ("attn_test_npy_" + name + "_" + std::to_string(random()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

/// Little-endian bytes of `values`, as .npy data.
template <typename Scalar>
std::string data_bytes(std::initializer_list<Scalar> values) {
  std::string bytes(values.size() * sizeof(Scalar), '\0');
  std::memcpy(bytes.data(), values.begin(), bytes.size());
  if (!attn::npy::detail::host_is_little_endian()) {
    attn::npy::detail::reverse_item_bytes(bytes.data(), values.size(), sizeof(Scalar));
  }
  return bytes;
}

/// A .npy file by hand: the prefix for `major`.0, then `dict` and a newline (not padded:
/// the format does not require it), then `data`.
std::string npy_bytes(const std::string& dict, const std::string& data, int major = 1) {
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  const std::size_t length = dict.size() + 1;
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  for (std::size_t i = 0; i < length_bytes; ++i) out += static_cast<char>((length >> (8 * i)) & 0xff);
  return out + dict + "\n" + data;
}

std::string header(const std::string& descr, const std::string& fortran_order, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran_order + ", 'shape': " + shape + ", }";
}

/// Bitwise equality, so that NaN payloads, infinities and -0.0 all count.
template <typename A, typename B>
bool same_bits(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  using Scalar = typename A::Scalar;
  static_assert(std::is_same_v<Scalar, typename B::Scalar>);
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  const Matrix<Scalar> plain_a = a;
  const Matrix<Scalar> plain_b = b;
  return plain_a.size() == 0 ||
         std::memcmp(plain_a.data(), plain_b.data(), static_cast<std::size_t>(plain_a.size()) * sizeof(Scalar)) == 0;
}

/// The fixtures' 2×3 values, as make_fixtures.py spells them.
Eigen::MatrixXd values_2x3() {
  Eigen::MatrixXd m(2, 3);
  m << 1.5, -2.25, 3.0, 0.1, 1e-300, -0.0;
  return m;
}

/// A half matrix from IEEE binary16 bit patterns, listed row by row.
Matrix<Eigen::half> half_matrix_from_bits(Index rows, Index cols, const std::vector<std::uint16_t>& bits) {
  REQUIRE(bits.size() == static_cast<std::size_t>(rows * cols));
  Matrix<Eigen::half> m(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    for (Index c = 0; c < cols; ++c) {
      m(r, c) = Eigen::numext::bit_cast<Eigen::half>(bits[static_cast<std::size_t>(r * cols + c)]);
    }
  }
  return m;
}

/// The bit patterns of a half matrix, row by row: compared as integers, so that -0, NaN
/// and its payload count, and Catch2 prints them.
std::vector<std::uint16_t> bits_by_rows(const Matrix<Eigen::half>& m) {
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(m.size()));
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c) {
      bits[static_cast<std::size_t>(r * m.cols() + c)] = Eigen::numext::bit_cast<std::uint16_t>(m(r, c));
    }
  }
  return bits;
}

bool is_half_nan(std::uint16_t bits) { return (bits & 0x7fff) > 0x7c00; }

/// IEEE binary16 `bits` decoded from the definition, in double: a sign, 5 exponent bits
/// biased by 15 and 10 fraction bits; exponent 0 is subnormal, 0.f × 2^-14; 31 is inf
/// (fraction 0) or NaN.
double binary16_value(std::uint16_t bits) {
  const double sign = (bits & 0x8000) != 0 ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1f;
  const auto fraction = static_cast<double>(bits & 0x3ff);
  if (exponent == 0x1f) return fraction == 0 ? sign * std::numeric_limits<double>::infinity() : std::nan("");
  if (exponent == 0) return sign * std::ldexp(fraction, -24);
  return sign * std::ldexp(1024 + fraction, exponent - 25);
}

/// The bits of v1_f2_c_2x4.npy's values, as make_fixtures.py spells them: 1.5, -2.25,
/// 65504 (half's largest), 0.1 rounded to half (0.0999755859375), -0.0, 2^-24 (the
/// smallest subnormal), inf and NaN.
const std::vector<std::uint16_t> f2_2x4_bits = {0x3e00, 0xc080, 0x7bff, 0x2e66, 0x8000, 0x0001, 0x7c00, 0x7e00};

}  // namespace

static_assert(std::is_base_of_v<std::runtime_error, attn::npy_error>,
              "callers catching std::runtime_error also catch .npy errors");

TEST_CASE("NumPy's own files load with their exact values", "[npy]") {
  const Eigen::MatrixXd expected = values_2x3();
  SECTION("version 1.0, float64, C order, as written by np.save") {
    const Eigen::MatrixXd m = attn::npy::load<double>(fixture("v1_f8_c_2x3.npy"));
    CHECK(same_bits(m, expected));
  }
  SECTION("versions 2.0 and 3.0, float64, Fortran order") {
    CHECK(same_bits(attn::npy::load<double>(fixture("v2_f8_fortran_2x3.npy")), expected));
    CHECK(same_bits(attn::npy::load<double>(fixture("v3_f8_fortran_2x3.npy")), expected));
  }
  SECTION("version 2.0, float32, C order") {
    const Eigen::MatrixXf m = attn::npy::load<float>(fixture("v2_f4_c_2x3.npy"));
    // NumPy's astype('<f4') rounds to nearest, as static_cast does: 0.1 becomes 0.1f and
    // 1e-300 becomes 0.
    CHECK(same_bits(m, Eigen::MatrixXf(expected.cast<float>())));
    CHECK(m(1, 0) == 0.1f);
    CHECK(m(1, 1) == 0.0f);
  }
  SECTION("version 1.0, float32, Fortran order") {
    Eigen::MatrixXf expected_f(3, 2);
    expected_f << 1, 2, 3, 4, 5, 6.5f;
    CHECK(same_bits(attn::npy::load<float>(fixture("v1_f4_fortran_3x2.npy")), expected_f));
  }
  SECTION("a 1-D array of length n is an n x 1 column") {
    const Eigen::MatrixXd m = attn::npy::load<double>(fixture("v1_f8_1d_4.npy"));
    REQUIRE(m.rows() == 4);
    REQUIRE(m.cols() == 1);
    const Eigen::VectorXd v = attn::npy::load<double>(fixture("v1_f8_1d_4.npy"));
    CHECK(same_bits(v, Eigen::Vector4d(0.5, -1.0, 2.0, 0.1)));
    const Eigen::MatrixXf f = attn::npy::load<float>(fixture("v3_f4_1d_3.npy"));
    CHECK(same_bits(f, Eigen::Vector3f(1.0f, 0.1f, -3.5f)));
  }
  SECTION("a 0x3 array keeps its shape") {
    const Eigen::MatrixXf m = attn::npy::load<float>(fixture("v1_f4_empty_0x3.npy"));
    CHECK(m.rows() == 0);
    CHECK(m.cols() == 3);
  }
}

TEST_CASE("float32 files load as double and float64 files as float", "[npy]") {
  const Eigen::MatrixXd from_f4 = attn::npy::load<double>(fixture("v2_f4_c_2x3.npy"));
  CHECK(same_bits(from_f4, Eigen::MatrixXd(values_2x3().cast<float>().cast<double>())));
  const Eigen::MatrixXf from_f8 = attn::npy::load<float>(fixture("v3_f8_fortran_2x3.npy"));
  CHECK(same_bits(from_f8, Eigen::MatrixXf(values_2x3().cast<float>())));
  const Eigen::MatrixXd from_f4_fortran = attn::npy::load<double>(fixture("v1_f4_fortran_3x2.npy"));
  CHECK(from_f4_fortran(2, 1) == 6.5);
  CHECK(from_f4_fortran(1, 0) == 3.0);
}

TEST_CASE("save writes the bytes np.save writes", "[npy]") {
  TempDir dir("save_bytes");
  attn::npy::save(dir / "m.npy", values_2x3());
  CHECK(read_file(dir / "m.npy") == read_file(fixture("v1_f8_c_2x3.npy")));

  // Every shape: version 1.0, the data at a multiple of 64 bytes, the header ending in '\n'.
  const auto [rows, cols] = GENERATE(table<Index, Index>({{0, 0}, {1, 1}, {3, 0}, {7, 5}, {123456789, 0}}));
  attn::npy::save(dir / "f.npy", Eigen::MatrixXf(rows, cols));
  const std::string bytes = read_file(dir / "f.npy");
  REQUIRE(bytes.size() >= 10);
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t header_length =
      static_cast<unsigned char>(bytes[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
  const std::size_t data_offset = 10 + header_length;
  CHECK(data_offset % 64 == 0);
  CHECK(bytes[data_offset - 1] == '\n');
  CHECK(bytes.size() == data_offset + static_cast<std::size_t>(rows * cols) * sizeof(float));
  CHECK_THAT(bytes.substr(10, header_length),
             ContainsSubstring("'shape': (" + std::to_string(rows) + ", " + std::to_string(cols) + ")"));
}

TEMPLATE_TEST_CASE("save then load gives back every input exactly", "[npy]", float, double) {
  using Scalar = TestType;
  TempDir dir("round_trip");
  const fs::path path = dir / "m.npy";
  // 130x70 doubles span two 64 KiB chunks of rows in the writer.
  const auto [rows, cols] = GENERATE(table<Index, Index>({{1, 1}, {2, 3}, {4, 1}, {1, 5}, {0, 3}, {3, 0}, {0, 0}, {130, 70}}));
  CAPTURE(rows, cols);
  Matrix<Scalar> m = attn_test::random_matrix<Scalar>(rows, cols, static_cast<std::uint32_t>(rows * 1000 + cols), 10.0);
  if (m.size() >= 3) {
    m.data()[0] = std::numeric_limits<Scalar>::quiet_NaN();
    m.data()[1] = -std::numeric_limits<Scalar>::infinity();
    m.data()[2] = Scalar(-0.0);
  }

  SECTION("column-major") {
    attn::npy::save(path, m);
    CHECK(same_bits(attn::npy::load<Scalar>(path), m));
  }
  SECTION("row-major") {
    const RowMajorMatrix<Scalar> row_major = m;
    attn::npy::save(path, row_major);
    CHECK(same_bits(attn::npy::load<Scalar>(path), m));
  }
  SECTION("a block of a larger matrix, and a Map with an outer stride") {
    Matrix<Scalar> big = Matrix<Scalar>::Constant(rows + 3, cols + 2, Scalar(7));
    big.block(1, 2, rows, cols) = m;
    attn::npy::save(path, big.block(1, 2, rows, cols));
    CHECK(same_bits(attn::npy::load<Scalar>(path), m));
    const Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>> map(big.data() + 1 + 2 * big.rows(), rows, cols,
                                                                        Eigen::OuterStride<>(big.rows()));
    attn::npy::save(path, map);
    CHECK(same_bits(attn::npy::load<Scalar>(path), m));
  }
  SECTION("a transpose and an expression") {
    attn::npy::save(path, m.transpose());
    CHECK(same_bits(attn::npy::load<Scalar>(path), Matrix<Scalar>(m.transpose())));
    const Matrix<Scalar> finite = m.unaryExpr([](Scalar x) { return std::isfinite(x) ? x : Scalar(1); });
    attn::npy::save(path, finite * Scalar(2) + Matrix<Scalar>::Ones(rows, cols));
    CHECK(same_bits(attn::npy::load<Scalar>(path), Matrix<Scalar>(finite * Scalar(2) + Matrix<Scalar>::Ones(rows, cols))));
  }
  SECTION("into the other scalar") {
    attn::npy::save(path, m);
    using Other = std::conditional_t<std::is_same_v<Scalar, float>, double, float>;
    const Matrix<Other> other = attn::npy::load<Other>(path);
    CHECK(same_bits(other, Matrix<Other>(m.template cast<Other>())));
  }
  SECTION("from memory, as from the file") {
    attn::npy::save(path, m);
    CHECK(same_bits(attn::npy::load_from_memory<Scalar>(read_file(path)), m));
  }
}

TEST_CASE("a fixed-size row vector is saved as 1 x n and loads back so", "[npy]") {
  TempDir dir("row_vector");
  const Eigen::RowVector3d row(1.0, 2.0, 3.0);
  attn::npy::save(dir / "row.npy", row);
  const Eigen::MatrixXd m = attn::npy::load<double>(dir / "row.npy");
  CHECK(m.rows() == 1);
  CHECK(m.cols() == 3);
  CHECK(same_bits(m, row));
}

TEST_CASE("NumPy's float16 files load with their exact values, as half, float and double", "[npy][half]") {
  SECTION("version 1.0, C order, as written by np.save") {
    const Matrix<Eigen::half> h = attn::npy::load<Eigen::half>(fixture("v1_f2_c_2x4.npy"));
    REQUIRE(h.rows() == 2);
    REQUIRE(h.cols() == 4);
    CHECK(bits_by_rows(h) == f2_2x4_bits);

    // Every half is a float and a double: NumPy's astype('<f4') and astype('<f8') are exact.
    const Eigen::MatrixXd d = attn::npy::load<double>(fixture("v1_f2_c_2x4.npy"));
    REQUIRE(d.rows() == 2);
    REQUIRE(d.cols() == 4);
    CHECK(d(0, 0) == 1.5);
    CHECK(d(0, 1) == -2.25);
    CHECK(d(0, 2) == 65504.0);
    CHECK(d(0, 3) == 0.0999755859375);
    CHECK(d(1, 0) == 0.0);
    CHECK(std::signbit(d(1, 0)));
    CHECK(d(1, 1) == 0x1p-24);
    CHECK(d(1, 2) == std::numeric_limits<double>::infinity());
    CHECK(std::isnan(d(1, 3)));

    const Eigen::MatrixXf f = attn::npy::load<float>(fixture("v1_f2_c_2x4.npy"));
    CHECK(same_bits(f, Eigen::MatrixXf(d.cast<float>())));
    CHECK(f(0, 3) == 0.0999755859375f);
    CHECK(std::signbit(f(1, 0)));
    CHECK(f(1, 1) == 0x1p-24f);
    CHECK(std::isnan(f(1, 3)));
  }
  SECTION("version 3.0, Fortran order") {
    const std::vector<std::uint16_t> expected_bits = {0x3c00, 0x0400, 0xfbff, 0x03ff, 0xb800, 0xfc00};
    const Matrix<Eigen::half> h = attn::npy::load<Eigen::half>(fixture("v3_f2_fortran_3x2.npy"));
    REQUIRE(h.rows() == 3);
    REQUIRE(h.cols() == 2);
    CHECK(bits_by_rows(h) == expected_bits);
    Eigen::MatrixXd expected(3, 2);
    expected << 1.0, 0x1p-14, -65504.0, 1023 * 0x1p-24, -0.5, -std::numeric_limits<double>::infinity();
    CHECK(same_bits(attn::npy::load<double>(fixture("v3_f2_fortran_3x2.npy")), expected));
    CHECK(same_bits(attn::npy::load<float>(fixture("v3_f2_fortran_3x2.npy")), Eigen::MatrixXf(expected.cast<float>())));
  }
}

TEST_CASE("save writes '<f2' for a half matrix, the bytes np.save writes", "[npy][half]") {
  TempDir dir("save_half");
  const std::string numpy_bytes = read_file(fixture("v1_f2_c_2x4.npy"));
  REQUIRE_THAT(numpy_bytes, ContainsSubstring("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 4), }"));
  const Matrix<Eigen::half> h = half_matrix_from_bits(2, 4, f2_2x4_bits);
  attn::npy::save(dir / "h.npy", h);
  CHECK(read_file(dir / "h.npy") == numpy_bytes);
  const RowMajorMatrix<Eigen::half> row_major = h;
  attn::npy::save(dir / "row_major.npy", row_major);
  CHECK(read_file(dir / "row_major.npy") == numpy_bytes);
  // A float matrix saved as float16 through a cast: float to half rounds, and every value
  // here is a half already.
  attn::npy::save(dir / "cast.npy", attn::npy::load<float>(fixture("v1_f2_c_2x4.npy")).cast<Eigen::half>());
  CHECK(read_file(dir / "cast.npy") == numpy_bytes);
}

TEST_CASE("every half survives save and load bit for bit, and loads as float and double exactly", "[npy][half]") {
  // All 65536 bit patterns (both zeros, every subnormal, 65504, both infinities and every
  // NaN), pattern i at row i / 256, column i % 256: 128 KiB, two of the writer's chunks.
  std::vector<std::uint16_t> all_bits(65536);
  for (std::size_t i = 0; i < all_bits.size(); ++i) all_bits[i] = static_cast<std::uint16_t>(i);
  const Matrix<Eigen::half> h = half_matrix_from_bits(256, 256, all_bits);
  TempDir dir("half_round_trip");
  const fs::path path = dir / "h.npy";
  attn::npy::save(path, h);
  CHECK(fs::file_size(path) == 128 + 2 * 65536);

  const Matrix<Eigen::half> again = attn::npy::load<Eigen::half>(path);
  REQUIRE(again.rows() == 256);
  REQUIRE(again.cols() == 256);
  // Compared as a bool: on failure Catch2 would print 65536 numbers.
  const bool same = bits_by_rows(again) == all_bits;
  CHECK(same);
  const bool same_from_memory = bits_by_rows(attn::npy::load_from_memory<Eigen::half>(read_file(path))) == all_bits;
  CHECK(same_from_memory);
  const auto bits_at = [&](std::uint16_t bits) { return again(bits / 256, bits % 256); };
  CHECK(static_cast<float>(bits_at(0x7bff)) == 65504.0f);
  CHECK(static_cast<float>(bits_at(0xfbff)) == -65504.0f);
  CHECK(static_cast<float>(bits_at(0x0001)) == 0x1p-24f);
  CHECK(std::signbit(static_cast<float>(bits_at(0x8000))));
  CHECK(static_cast<float>(bits_at(0xfc00)) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(static_cast<float>(bits_at(0x7e00))));

  // As double and float, each value is the one the bits define, NaN as NaN and -0 as -0.
  const Eigen::MatrixXd d = attn::npy::load<double>(path);
  const Eigen::MatrixXf f = attn::npy::load<float>(path);
  REQUIRE(d.rows() == 256);
  REQUIRE(f.cols() == 256);
  std::size_t wrong_double = 0, wrong_float = 0;
  for (std::size_t i = 0; i < all_bits.size(); ++i) {
    const auto bits = static_cast<std::uint16_t>(i);
    const double expected = binary16_value(bits);
    const double loaded_d = d(static_cast<Index>(i / 256), static_cast<Index>(i % 256));
    const float loaded_f = f(static_cast<Index>(i / 256), static_cast<Index>(i % 256));
    if (is_half_nan(bits)) {
      wrong_double += !std::isnan(loaded_d);
      wrong_float += !std::isnan(loaded_f);
    } else {
      wrong_double += !(loaded_d == expected && std::signbit(loaded_d) == std::signbit(expected));
      wrong_float += !(static_cast<double>(loaded_f) == expected && std::signbit(loaded_f) == std::signbit(expected));
    }
  }
  CHECK(wrong_double == 0);
  CHECK(wrong_float == 0);
  CHECK(d(0x7b, 0xff) == 65504.0);
  CHECK(d(0x03, 0xff) == 1023 * 0x1p-24);
  CHECK(d(0x80, 0x01) == -0x1p-24);
  CHECK(d(0x7c, 0x00) == std::numeric_limits<double>::infinity());
}

TEST_CASE("float32 and float64 files load as half rounded once to nearest even, as NumPy's astype('<f2')",
          "[npy][half]") {
  constexpr float inf = std::numeric_limits<float>::infinity();
  SECTION("float32: ties go to the even half") {
    // Expected bits from NumPy 1.24: np.array(values, '<f4').astype('<f2').view('<u2').
    const std::string bytes = npy_bytes(
        header("<f4", "False", "(12,)"),
        data_bytes<float>({1 + 0x1p-11f, 1 + 3 * 0x1p-11f, 65504.0f, 65519.0f, 65519.99f, 0x1p-25f, 3 * 0x1p-25f, -0.0f,
                           inf, std::numeric_limits<float>::quiet_NaN(), 0.1f, -1.5f * 0x1p-24f}));
    const std::vector<std::uint16_t> bits = bits_by_rows(attn::npy::load_from_memory<Eigen::half>(bytes));
    REQUIRE(bits.size() == 12);
    CHECK(std::vector<std::uint16_t>(bits.begin(), bits.begin() + 9) ==
          std::vector<std::uint16_t>{0x3c00, 0x3c02, 0x7bff, 0x7bff, 0x7bff, 0x0000, 0x0002, 0x8000, 0x7c00});
    CHECK(is_half_nan(bits[9]));
    CHECK(bits[10] == 0x2e66);
    CHECK(bits[11] == 0x8002);
  }
  SECTION("float64: rounded once, not through float") {
    // Through float, 65520 - 2^-20 would become 65520, a tie, and then inf; 1 + 2^-11 +
    // 2^-30 would become 1 + 2^-11 and then 1; 2^-25 + 2^-60 would become 2^-25 and then 0.
    const std::string bytes = npy_bytes(header("<f8", "False", "(8,)"),
                                        data_bytes<double>({65520 - 0x1p-20, 1 + 0x1p-11 + 0x1p-30, 1 + 0x1p-11, 0.1,
                                                            -1e-300, 0x1p-25 + 0x1p-60, 1e-8, -65504.0}));
    CHECK(bits_by_rows(attn::npy::load_from_memory<Eigen::half>(bytes)) ==
          std::vector<std::uint16_t>{0x7bff, 0x3c01, 0x3c00, 0x2e66, 0x8000, 0x0001, 0x0000, 0xfbff});
    const std::string special = npy_bytes(header("<f8", "True", "(1, 3)"),
                                          data_bytes<double>({-std::numeric_limits<double>::infinity(), std::nan(""), 0x1p-24}));
    const std::vector<std::uint16_t> special_bits = bits_by_rows(attn::npy::load_from_memory<Eigen::half>(special));
    REQUIRE(special_bits.size() == 3);
    CHECK(special_bits[0] == 0xfc00);
    CHECK(is_half_nan(special_bits[1]));
    CHECK(special_bits[2] == 0x0001);
  }
  SECTION("NumPy's float32 file in Fortran order") {
    CHECK(bits_by_rows(attn::npy::load<Eigen::half>(fixture("v1_f4_fortran_3x2.npy"))) ==
          std::vector<std::uint16_t>{0x3c00, 0x4000, 0x4200, 0x4400, 0x4500, 0x4680});
  }
}

TEST_CASE("C and Fortran order give the same matrix from their own layouts", "[npy]") {
  // The same 2x3 matrix [[1, 2, 3], [4, 5, 6]], stored by rows and by columns.
  const Eigen::MatrixXd expected = (Eigen::MatrixXd(2, 3) << 1, 2, 3, 4, 5, 6).finished();
  const std::string c_order = npy_bytes(header("<f8", "False", "(2, 3)"), data_bytes<double>({1, 2, 3, 4, 5, 6}));
  const std::string fortran = npy_bytes(header("<f8", "True", "(2, 3)"), data_bytes<double>({1, 4, 2, 5, 3, 6}));
  CHECK(same_bits(attn::npy::load_from_memory<double>(c_order), expected));
  CHECK(same_bits(attn::npy::load_from_memory<double>(fortran), expected));
  CHECK(same_bits(attn::npy::load_from_memory<float>(fortran), Eigen::MatrixXf(expected.cast<float>())));
  // A 1-D array is the same in either order.
  const std::string column = npy_bytes(header("<f4", "True", "(3,)"), data_bytes<float>({1, 2, 3}), 3);
  CHECK(same_bits(attn::npy::load_from_memory<float>(column), Eigen::Vector3f(1, 2, 3)));
}

TEST_CASE("the header parser reads what NumPy may write, in any layout", "[npy]") {
  using attn::npy::detail::Dtype;
  using attn::npy::detail::parse_header;
  const auto h = parse_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }          \n");
  CHECK(h.dtype == Dtype::f4);
  CHECK(h.fortran_order);
  CHECK(h.ndim == 2);
  CHECK(h.rows == 2);
  CHECK(h.cols == 3);
  CHECK(h.data_bytes == 24);

  // Keys in any order, double quotes, no trailing commas, whitespace anywhere.
  const auto g = parse_header(" {\"shape\":(7,),\t\"fortran_order\" :False ,\r\n 'descr':\"<f8\"}\n");
  CHECK(g.dtype == Dtype::f8);
  CHECK_FALSE(g.fortran_order);
  CHECK(g.ndim == 1);
  CHECK(g.rows == 7);
  CHECK(g.cols == 1);
  CHECK(g.data_bytes == 56);

  const auto e = parse_header("{'descr':'<f8','fortran_order':False,'shape':(0,5,),}");
  CHECK(e.rows == 0);
  CHECK(e.cols == 5);
  CHECK(e.data_bytes == 0);
  const auto f2 = parse_header("{'descr': '<f2', 'fortran_order': False, 'shape': (3, 5), }\n");
  CHECK(f2.dtype == Dtype::f2);
  CHECK(f2.data_bytes == 30);
  // The largest shapes whose byte count still fits are accepted by the parser; the data
  // length check then refuses them unless the file really holds that much.
  const auto big = parse_header("{'descr':'<f4','fortran_order':False,'shape':(4294967296, 4),}");
  CHECK(big.data_bytes == std::size_t{64} << 30);
}

TEST_CASE("frame_header switches to version 2.0 only when the header outgrows 64 KiB", "[npy]") {
  using attn::npy::detail::frame_header;
  const std::string small = frame_header("{}");
  CHECK(small.size() == 64);
  CHECK(small[6] == '\x01');
  // 10 prefix bytes + 65524 + 1 padding byte + '\n' = 65536: the largest 1.0 header. One
  // more byte would need 64 bytes of padding and a length of 65590, past 2 bytes.
  const std::string at_limit = frame_header("{" + std::string(65522, ' ') + "}");
  CHECK(at_limit[6] == '\x01');
  CHECK(at_limit.size() == 65536);
  const std::string past_limit = frame_header("{" + std::string(65523, ' ') + "}");
  CHECK(past_limit[6] == '\x02');
  CHECK(past_limit.size() % 64 == 0);
  const std::string large = frame_header("{" + std::string(70000, ' ') + "}");
  CHECK(large[6] == '\x02');
  CHECK(large.size() % 64 == 0);
  const std::size_t length = static_cast<unsigned char>(large[8]) | static_cast<std::size_t>(static_cast<unsigned char>(large[9])) << 8 |
                             static_cast<std::size_t>(static_cast<unsigned char>(large[10])) << 16;
  CHECK(length == large.size() - 12);
  CHECK(large.back() == '\n');
}

TEST_CASE("reverse_item_bytes swaps each item, for big-endian hosts", "[npy]") {
  unsigned char bytes[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  attn::npy::detail::reverse_item_bytes(bytes, 2, 4);
  const unsigned char expected[8] = {4, 3, 2, 1, 8, 7, 6, 5};
  CHECK(std::memcmp(bytes, expected, 8) == 0);
}

namespace {

/// Loading `bytes` from a file fails with `reason` and the path in the message; loading
/// them from memory fails with the same reason.
void check_rejected(const TempDir& dir, const std::string& bytes, const std::string& reason) {
  CAPTURE(reason);
  const fs::path path = dir / "bad.npy";
  write_file(path, bytes);
  CHECK_THROWS_AS(attn::npy::load<double>(path), attn::npy_error);
  CHECK_THROWS_WITH(attn::npy::load<double>(path), ContainsSubstring("attn::npy::load: \"" + path.string() + "\": "));
  CHECK_THROWS_WITH(attn::npy::load<float>(path), ContainsSubstring(reason));
  CHECK_THROWS_AS(attn::npy::load_from_memory<float>(bytes), attn::npy_error);
  CHECK_THROWS_WITH(attn::npy::load_from_memory<double>(bytes), ContainsSubstring("attn::npy::load_from_memory: "));
  CHECK_THROWS_WITH(attn::npy::load_from_memory<double>(bytes), ContainsSubstring(reason));
}

}  // namespace

TEST_CASE("files that cannot be opened are refused with their path", "[npy][errors]") {
  TempDir dir("open");
  const fs::path missing = dir / "missing.npy";
  CHECK_THROWS_AS(attn::npy::load<double>(missing), attn::npy_error);
  CHECK_THROWS_WITH(attn::npy::load<double>(missing),
                    "attn::npy::load: \"" + missing.string() + "\": cannot open: no such file");
  CHECK_THROWS_WITH(attn::npy::load<double>(dir.path()),
                    "attn::npy::load: \"" + dir.path().string() + "\": cannot open: it is a directory");
  CHECK_THROWS_WITH(attn::npy::load<double>(dir / "missing_dir" / "m.npy"), ContainsSubstring("cannot open"));
}

TEST_CASE("saving to a path that cannot be written throws", "[npy][errors]") {
  TempDir dir("unwritable");
  const Eigen::MatrixXd m = Eigen::MatrixXd::Ones(2, 2);
  const fs::path no_parent = dir / "no_such_dir" / "m.npy";
  CHECK_THROWS_AS(attn::npy::save(no_parent, m), attn::npy_error);
  CHECK_THROWS_WITH(attn::npy::save(no_parent, m),
                    ContainsSubstring("attn::npy::save: \"" + no_parent.string() + "\": cannot open for writing"));
  CHECK_THROWS_WITH(attn::npy::save(dir.path(), m), ContainsSubstring("cannot open for writing"));
  // A device that accepts the open and refuses the data: the failed write is reported,
  // not lost in the stream's state. (Linux only; elsewhere there is no such file.)
  if (fs::exists("/dev/full")) {
    CHECK_THROWS_WITH(attn::npy::save("/dev/full", m), ContainsSubstring("attn::npy::save: \"/dev/full\": write failed"));
  }
}

namespace {

/// The names in `directory`, sorted: what a save left behind.
std::vector<std::string> file_names(const fs::path& directory) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("save replaces an existing file whole, keeping its permissions", "[npy]") {
  TempDir dir("replace");
  const fs::path path = dir / "m.npy";
  attn::npy::save(path, Eigen::MatrixXf::Ones(40, 30));
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write);
  attn::npy::save(path, values_2x3());
  CHECK(read_file(path) == read_file(fixture("v1_f8_c_2x3.npy")));
  CHECK((fs::status(path).permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write));
  CHECK(file_names(dir.path()) == std::vector<std::string>{"m.npy"});
}

TEST_CASE("save through a symbolic link replaces the file it names and keeps the link", "[npy]") {
  TempDir dir("symlink");
  fs::create_directories(dir / "runs");
  attn::npy::save(dir / "runs" / "w.npy", Eigen::MatrixXd::Zero(3, 3));
  fs::create_symlink(fs::path("runs") / "w.npy", dir / "latest.npy");
  attn::npy::save(dir / "latest.npy", values_2x3());
  CHECK(fs::is_symlink(fs::symlink_status(dir / "latest.npy")));
  CHECK(read_file(dir / "runs" / "w.npy") == read_file(fixture("v1_f8_c_2x3.npy")));
  CHECK(file_names(dir.path()) == std::vector<std::string>{"latest.npy", "runs"});
  CHECK(file_names(dir / "runs") == std::vector<std::string>{"w.npy"});
}

#ifdef ATTN_TEST_HAVE_RLIMIT
namespace {

/// Runs `save` with this process's files limited to `limit` bytes and SIGXFSZ ignored (so
/// that going past the limit fails the write with EFBIG instead of ending the process),
/// then restores both; returns the npy_error's message, or "" if nothing was thrown.
template <typename Save>
std::string npy_error_with_file_size_limit(rlim_t limit, Save&& save) {
  rlimit original{};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &original) == 0);
  rlimit lowered = original;
  lowered.rlim_cur = original.rlim_max == RLIM_INFINITY ? limit : std::min(limit, original.rlim_max);
  const auto original_handler = std::signal(SIGXFSZ, SIG_IGN);
  REQUIRE(original_handler != SIG_ERR);
  std::string message;
  if (setrlimit(RLIMIT_FSIZE, &lowered) == 0) {
    try {
      save();
    } catch (const attn::npy_error& error) {
      message = error.what();
    }
    REQUIRE(setrlimit(RLIMIT_FSIZE, &original) == 0);
  } else {
    message = "setrlimit failed";
  }
  std::signal(SIGXFSZ, original_handler);
  return message;
}

}  // namespace

TEST_CASE("a save that fails partway leaves the old file as it was and nothing beside it", "[npy][errors]") {
  TempDir dir("atomic");
  const fs::path path = dir / "m.npy";
  attn::npy::save(path, values_2x3());
  const std::string old_bytes = read_file(path);
  REQUIRE(old_bytes.size() == 176);
  // 512x512 doubles are 2 MiB: the 64 KiB limit stops the write in the data, after the
  // header and the first chunks have gone out, as a full disk would.
  const Eigen::MatrixXd large = Eigen::MatrixXd::Constant(512, 512, 0.25);
  const std::string message = npy_error_with_file_size_limit(64 * 1024, [&] { attn::npy::save(path, large); });
  CHECK_THAT(message, ContainsSubstring("attn::npy::save: \"" + path.string() + "\": write failed"));
  CHECK_THAT(message, ContainsSubstring(std::generic_category().message(EFBIG)));
  // Compared as a bool: on failure Catch2 would print 2 MiB of bytes.
  CHECK(fs::file_size(path) == old_bytes.size());
  const bool unchanged = read_file(path) == old_bytes;
  CHECK(unchanged);
  CHECK(file_names(dir.path()) == std::vector<std::string>{"m.npy"});

  // A new file that cannot be written completely is not created at all.
  const fs::path fresh = dir / "fresh.npy";
  const std::string fresh_message = npy_error_with_file_size_limit(64 * 1024, [&] { attn::npy::save(fresh, large); });
  CHECK_THAT(fresh_message, ContainsSubstring("attn::npy::save: \"" + fresh.string() + "\": write failed"));
  CHECK(file_names(dir.path()) == std::vector<std::string>{"m.npy"});

  // Without the limit the same save replaces the file.
  attn::npy::save(path, large);
  CHECK(same_bits(attn::npy::load<double>(path), large));
  CHECK(file_names(dir.path()) == std::vector<std::string>{"m.npy"});
}
#endif

TEST_CASE("corrupt prefixes: magic, version, lengths", "[npy][errors]") {
  TempDir dir("prefix");
  const std::string good = read_file(fixture("v1_f8_c_2x3.npy"));
  REQUIRE(attn::npy::load_from_memory<double>(good).size() == 6);

  check_rejected(dir, "", "truncated: the file has 0 bytes, but the .npy prefix needs 8");
  check_rejected(dir, good.substr(0, 5), "truncated: the file has 5 bytes");
  check_rejected(dir, good.substr(0, 9), "truncated: the file has 9 bytes, but the .npy prefix needs 10");
  check_rejected(dir, "PK\x03\x04 this is a zip", "not a .npy file: it does not start with \"\\x93NUMPY\"");
  check_rejected(dir, "\x93NUMPZ" + good.substr(6), "not a .npy file");

  std::string version = good;
  version[6] = '\x04';
  check_rejected(dir, version, "unsupported .npy format version 4.0 (attn reads 1.0, 2.0 and 3.0)");
  version[6] = '\x01';
  version[7] = '\x01';
  check_rejected(dir, version, "unsupported .npy format version 1.1");
  version[6] = '\x00';
  version[7] = '\x00';
  check_rejected(dir, version, "unsupported .npy format version 0.0");

  std::string long_header = good;
  long_header[8] = '\xff';
  long_header[9] = '\xff';
  check_rejected(dir, long_header, "the header length 65535 runs past the end of the file (166 bytes after the prefix)");
  // Version 2.0 reads 4 length bytes: 0xffffffff must be refused before anything is allocated.
  check_rejected(dir, npy_bytes("", "", 2).substr(0, 8) + std::string("\xff\xff\xff\xff", 4) + "{}",
                 "the header length 4294967295 runs past the end of the file (2 bytes after the prefix)");
  check_rejected(dir, npy_bytes("", "", 2).substr(0, 11), "truncated: the file has 11 bytes, but the .npy prefix needs 12");
}

TEST_CASE("data that does not match the shape", "[npy][errors]") {
  TempDir dir("data");
  const std::string good = read_file(fixture("v1_f8_c_2x3.npy"));
  check_rejected(dir, good.substr(0, good.size() - 1),
                 "truncated data: shape (2, 3) of <f8 needs 48 bytes, the file has 47");
  check_rejected(dir, good.substr(0, 128), "truncated data: shape (2, 3) of <f8 needs 48 bytes, the file has 0");
  check_rejected(dir, good + "extra", "data length does not match the shape: shape (2, 3) of <f8 needs 48 bytes, the file has 53");
  check_rejected(dir, npy_bytes(header("<f4", "False", "(5,)"), data_bytes<float>({1, 2})),
                 "truncated data: shape (5,) of <f4 needs 20 bytes, the file has 8");
  const std::string truncated_f2 = npy_bytes(header("<f2", "False", "(5,)"), data_bytes<std::uint16_t>({0x3c00, 0x4000}));
  check_rejected(dir, truncated_f2, "truncated data: shape (5,) of <f2 needs 10 bytes, the file has 4");
  const std::string good_f2 = read_file(fixture("v1_f2_c_2x4.npy"));
  check_rejected(dir, good_f2.substr(0, good_f2.size() - 1),
                 "truncated data: shape (2, 4) of <f2 needs 16 bytes, the file has 15");
  CHECK_THROWS_WITH(attn::npy::load_from_memory<Eigen::half>(truncated_f2),
                    "attn::npy::load_from_memory: truncated data: shape (5,) of <f2 needs 10 bytes, the file has 4");
  // A header cut short is a header length past the end.
  check_rejected(dir, good.substr(0, 60), "the header length 118 runs past the end of the file (50 bytes after the prefix)");
}

TEST_CASE("unsupported dtypes and shapes", "[npy][errors]") {
  TempDir dir("dtypes");
  const std::string data = data_bytes<double>({1, 2});
  for (const char* dtype : {">f2", ">f4", ">f8", "<i4", "|b1", "<c8", "|O", "<e", "f8", "<f16"}) {
    check_rejected(dir, npy_bytes(header(dtype, "False", "(2,)"), data),
                   std::string("unsupported dtype '") + dtype +
                       "': attn reads little-endian float16 ('<f2'), float32 ('<f4') and float64 ('<f8')");
  }
  // Big-endian data: the little-endian dtype of the same size, or float64.
  check_rejected(dir, npy_bytes(header(">f8", "False", "(2,)"), data), "convert big-endian data with arr.astype('<f8')");
  check_rejected(dir, npy_bytes(header(">f2", "False", "(2,)"), data), "convert big-endian data with arr.astype('<f2')");
  check_rejected(dir, npy_bytes(header(">f4", "False", "(2,)"), data), "convert big-endian data with arr.astype('<f4')");
  check_rejected(dir, npy_bytes(header(">i2", "False", "(2,)"), data), "convert big-endian data with arr.astype('<f8')");
  check_rejected(dir, npy_bytes("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (2,)}", data),
                 "structured dtypes (a list of fields as 'descr') are not supported");
  check_rejected(dir, npy_bytes(header("<f8", "False", "()"), data_bytes<double>({1})),
                 "0-D arrays (shape ()) are not supported: attn reads 1-D and 2-D arrays");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(1, 1, 2)"), data),
                 "3-D arrays are not supported: attn reads 1-D and 2-D arrays");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(1, 1, 1, 1, 2)"), data), "5-D arrays are not supported");
}

TEST_CASE("malformed headers: not a dict, keys, values", "[npy][errors]") {
  TempDir dir("header");
  const std::string data = data_bytes<double>({1, 2, 3, 4, 5, 6});
  const auto rejected = [&](const std::string& dict, const std::string& reason) {
    check_rejected(dir, npy_bytes(dict, data), reason);
  };
  rejected("", "malformed header at byte 1: the header is empty");
  rejected("[1, 2]", "malformed header at byte 0: the header is not a Python dict literal: it starts with '[1, 2]\\x0a'");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3)", "expected ',' or '}' after the value of 'shape'");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), ", "expected a key in quotes, found the end of the header");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3)} x", "unexpected text after the header dict: 'x\\x0a'");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3)}}", "unexpected text after the header dict");
  rejected("{}", "the header has no 'descr' key");
  rejected("{'descr': '<f8', 'shape': (2, 3)}", "the header has no 'fortran_order' key");
  rejected("{'descr': '<f8', 'fortran_order': False}", "the header has no 'shape' key");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), 'descr': '<f8'}",
           "malformed header at byte 58: the key 'descr' appears twice");
  rejected("{'shape': (2, 3), 'fortran_order': False, 'shape': (6,), 'descr': '<f8'}", "the key 'shape' appears twice");
  rejected("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), 'version': 1}",
           "unexpected key 'version' in the header (a .npy header has exactly 'descr', 'fortran_order' and 'shape')");
  rejected("{descr: '<f8'}", "expected a key in quotes, found 'descr: '<f8'}\\x0a'");
  rejected("{'descr' '<f8'}", "expected ':' after the key 'descr', found ''<f8'}\\x0a'");
  rejected("{'descr': '<f8}", "a string runs past the end of its line");
  rejected("{'descr': '<f8", "a string runs past the end of its line");
  rejected("{'descr': '<\\x66\\x38'}", "escape sequences in strings are not supported");
  rejected("{'descr': <f8}", "expected the dtype ('descr') in quotes, found '<f8}\\x0a'");
  rejected(header("<f8", "1", "(2, 3)"), "'fortran_order' must be True or False, found '1, 'shape'");
  rejected(header("<f8", "true", "(2, 3)"), "'fortran_order' must be True or False, found 'true,");
  rejected(header("<f8", "False", "[2, 3]"), "'shape' must be a tuple of integers such as (2, 3), found '[2, 3]");
  rejected(header("<f8", "False", "(2.0, 3)"), "expected ',' or ')' in 'shape', found '.0, 3)");
  rejected(header("<f8", "False", "('2', 3)"), "'shape' must hold non-negative integers, found ''2', 3)");
  rejected(header("<f8", "False", "(2, None)"), "'shape' must hold non-negative integers, found 'None)");
  rejected(header("<f8", "False", "(6)"), "'shape' is an integer in parentheses, not a tuple (write (n,))");
  rejected(header("<f8", "False", "(2 3)"), "expected ',' or ')' in 'shape', found '3)");
  rejected(header("<f8", "False", "(2,, 3)"), "'shape' must hold non-negative integers, found ', 3)");
  rejected(header("<f8", "False", "(2, 3"), "'shape' must hold non-negative integers, found '}\\x0a'");
  rejected(header("<f8", "False", "(-2, -3)"), "'shape' has a negative dimension '-2'");
  rejected(header("<f8", "False", "(2, -3)"), "'shape' has a negative dimension '-3'");
  rejected(header("<f8", "False", "(-, 3)"), "'shape' must hold non-negative integers, found '-, 3)");
  rejected(header("<f8", "False", "(2, 2)"),
           "data length does not match the shape: shape (2, 2) of <f8 needs 32 bytes, the file has 48");
}

TEST_CASE("a shape with a leading zero is refused, as Python 3 and NumPy refuse 007", "[npy][errors]") {
  TempDir dir("leading_zero");
  const std::string data = data_bytes<double>({1, 2, 3, 4, 5, 6});
  const auto rejected = [&](const std::string& shape, const std::string& reason) {
    check_rejected(dir, npy_bytes(header("<f8", "False", shape), data), reason);
  };
  // Python 2 read 010 as octal 8: taking it as 10 would be a third reading.
  rejected("(002, 03)", "malformed header at byte 51: 'shape' has a dimension with a leading zero '002' (Python 3 and NumPy "
                        "read no such integer)");
  rejected("(2, 03)", "malformed header at byte 54: 'shape' has a dimension with a leading zero '03'");
  rejected("(6, 01)", "'shape' has a dimension with a leading zero '01'");
  rejected("(02L, 3)", "'shape' has a dimension with a leading zero '02'");
  // Zero itself may be spelled with any number of zeros, in Python and so in NumPy.
  const Eigen::MatrixXd zeros = attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(00, 3)"), ""));
  CHECK(zeros.rows() == 0);
  CHECK(zeros.cols() == 3);
  const Eigen::MatrixXd none = attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(0, 000)"), ""));
  CHECK(none.rows() == 0);
  CHECK(none.cols() == 0);
}

TEST_CASE("Python 2's long integers in 'shape' are read from versions 1.0 and 2.0, as NumPy reads them", "[npy]") {
  // NumPy's bytes for the 2x3 fixture with the shape spelled (2L, 3L), as NumPy under
  // Python 2 wrote it; make_fixtures.py checks that NumPy loads it.
  CHECK(same_bits(attn::npy::load<double>(fixture("v1_f8_py2_long_2x3.npy")), values_2x3()));
  const std::string data = data_bytes<double>({1, 2, 3, 4, 5, 6});
  const Eigen::MatrixXd expected = (Eigen::MatrixXd(2, 3) << 1, 2, 3, 4, 5, 6).finished();
  CHECK(same_bits(attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(2L, 3L)"), data, 2)), expected));
  CHECK(same_bits(attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(2L,3L,)"), data)), expected));
  CHECK(same_bits(attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(2 L, 3)"), data)), expected));
  const Eigen::MatrixXd column = attn::npy::load_from_memory<double>(npy_bytes(header("<f8", "False", "(6L,)"), data));
  CHECK(same_bits(column, Eigen::VectorXd::LinSpaced(6, 1, 6)));

  // Version 3.0 came after Python 2, and NumPy does not look for the suffix there; nor is
  // a lower-case l, or an L that starts a longer word, the suffix.
  TempDir dir("python2_long");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(2L, 3L)"), data, 3),
                 "malformed header at byte 52: 'shape' has Python 2's long suffix 'L', which NumPy reads only in "
                 "format versions 1.0 and 2.0");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(2l, 3)"), data), "expected ',' or ')' in 'shape', found 'l, 3)");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(2Lx, 3)"), data), "expected ',' or ')' in 'shape', found 'x, 3)");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(2LL, 3)"), data), "expected ',' or ')' in 'shape', found 'L, 3)");
  check_rejected(dir, npy_bytes(header("<f8", "False", "(L, 3)"), data), "'shape' must hold non-negative integers, found 'L, 3)");
}

TEST_CASE("float64 values beyond float's range are refused when loading as float", "[npy][errors]") {
  TempDir dir("float_range");
  constexpr double float_max = std::numeric_limits<float>::max();
  constexpr double inf = std::numeric_limits<double>::infinity();
  // Rounding to nearest takes float_max + half its ulp (2^103) and everything above to inf,
  // and everything below to float_max.
  const double overflows = float_max + 0x1p103;
  const double rounds_down = std::nextafter(overflows, 0.0);

  SECTION("values that round to float's largest finite value load as it; inf and NaN as themselves") {
    const std::string bytes = npy_bytes(header("<f8", "False", "(2, 3)"),
                                        data_bytes<double>({rounds_down, -rounds_down, float_max, inf, -inf,
                                                            std::numeric_limits<double>::quiet_NaN()}));
    const Eigen::MatrixXf m = attn::npy::load_from_memory<float>(bytes);
    CHECK(m(0, 0) == std::numeric_limits<float>::max());
    CHECK(m(0, 1) == -std::numeric_limits<float>::max());
    CHECK(m(0, 2) == std::numeric_limits<float>::max());
    CHECK(m(1, 0) == std::numeric_limits<float>::infinity());
    CHECK(m(1, 1) == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(m(1, 2)));
  }

  const auto refused_as_float = [&](const std::string& bytes, const std::string& reason) {
    CAPTURE(reason);
    const fs::path path = dir / "big.npy";
    write_file(path, bytes);
    CHECK_THROWS_AS(attn::npy::load<float>(path), attn::npy_error);
    CHECK_THROWS_WITH(attn::npy::load<float>(path), "attn::npy::load: \"" + path.string() + "\": " + reason);
    CHECK_THROWS_WITH(attn::npy::load_from_memory<float>(bytes), "attn::npy::load_from_memory: " + reason);
    // As double, the same file is fine.
    CHECK_NOTHROW(attn::npy::load<double>(path));
  };
  SECTION("the first such value in the file is named, with its position in the array") {
    // The matrix [[1, 2, 1e300], [-1e300, 5, 6]], by rows and by columns: each order meets
    // a different one first.
    const std::string c_order = npy_bytes(header("<f8", "False", "(2, 3)"), data_bytes<double>({1, 2, 1e300, -1e300, 5, 6}));
    refused_as_float(c_order, "the float64 value 1e+300 at [0, 2] is too large for float (it would load as inf): load "
                              "the file as double");
    CHECK(attn::npy::load_from_memory<double>(c_order)(0, 2) == 1e300);
    const std::string fortran = npy_bytes(header("<f8", "True", "(2, 3)"), data_bytes<double>({1, -1e300, 2, 5, 1e300, 6}));
    refused_as_float(fortran, "the float64 value -1e+300 at [1, 0] is too large for float (it would load as inf): load "
                              "the file as double");
    CHECK(attn::npy::load_from_memory<double>(fortran)(1, 0) == -1e300);
  }
  SECTION("the smallest value that overflows, in a 1-D array") {
    refused_as_float(npy_bytes(header("<f8", "False", "(4,)"), data_bytes<double>({0, inf, 1, -overflows})),
                     "the float64 value -3.4028235677973366e+38 at [3] is too large for float (it would load as inf): "
                     "load the file as double");
  }
}

TEST_CASE("float32 and float64 values beyond half's range are refused when loading as half", "[npy][half][errors]") {
  TempDir dir("half_range");
  const auto refused_as_half = [&](const std::string& bytes, const std::string& reason) {
    CAPTURE(reason);
    const fs::path path = dir / "big.npy";
    write_file(path, bytes);
    CHECK_THROWS_AS(attn::npy::load<Eigen::half>(path), attn::npy_error);
    CHECK_THROWS_WITH(attn::npy::load<Eigen::half>(path), "attn::npy::load: \"" + path.string() + "\": " + reason);
    CHECK_THROWS_WITH(attn::npy::load_from_memory<Eigen::half>(bytes), "attn::npy::load_from_memory: " + reason);
    // As float, the same file is fine.
    CHECK_NOTHROW(attn::npy::load<float>(path));
  };
  // Rounding to nearest takes 65504 + 16 (half its last place) and everything above to inf.
  refused_as_half(npy_bytes(header("<f4", "False", "(2, 3)"), data_bytes<float>({1, 2, 65520, 65519, -1e5f, 6})),
                  "the float32 value 65520 at [0, 2] is too large for half (it would load as inf): load the file as "
                  "float");
  refused_as_half(npy_bytes(header("<f8", "True", "(2, 2)"), data_bytes<double>({1, -65520.5, 65519.9, 4})),
                  "the float64 value -65520.5 at [1, 0] is too large for half (it would load as inf): load the file as "
                  "double");
  refused_as_half(npy_bytes(header("<f8", "False", "(3,)"), data_bytes<double>({std::numeric_limits<double>::infinity(),
                                                                                 std::nan(""), 1e30})),
                  "the float64 value 1e+30 at [2] is too large for half (it would load as inf): load the file as double");
}

TEST_CASE("shapes too large for memory are refused before anything is allocated", "[npy][errors]") {
  TempDir dir("overflow");
  const std::string data = data_bytes<double>({1, 2, 3, 4, 5, 6});
  const auto rejected = [&](const std::string& shape, const std::string& reason) {
    check_rejected(dir, npy_bytes(header("<f8", "False", shape), data), reason);
  };
  rejected("(99999999999999999999999999, 1)", "'shape' has a dimension too large for memory: '99999999999999999999999999'");
  rejected("(1, 18446744073709551616)", "'shape' has a dimension too large for memory: '18446744073709551616'");
  // 2^60 doubles are 2^63 bytes: one past what fits.
  rejected("(1152921504606846976,)", "'shape' has a dimension too large for memory");
  rejected("(4294967296, 4294967296)", "'shape' (4294967296, 4294967296) has more elements than fit in memory");
  rejected("(0, 99999999999999999999)", "'shape' has a dimension too large for memory");
  // Large but representable: the data length check refuses it.
  rejected("(1000000, 1000000)", "truncated data: shape (1000000, 1000000) of <f8 needs 8000000000000 bytes, the file has 48");
}
