// libFuzzer target for attn's .npy reader: the header parser on its own, and the whole
// in-memory loader. A rejected input must throw attn::npy_error; anything else (another
// exception, a crash, an AddressSanitizer or UndefinedBehaviorSanitizer report, a broken
// invariant below) is a finding.
//
//   cmake -S . -B build/fuzz -DCMAKE_CXX_COMPILER=clang++ -DATTN_BUILD_FUZZERS=ON
//   cmake --build build/fuzz --target attn_fuzz_npy_header
//   cp -r tests/fuzz/corpus build/fuzz/corpus
//   build/fuzz/tests/fuzz/attn_fuzz_npy_header build/fuzz/corpus -max_total_time=60

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include <attn/npy.hpp>

namespace {

void require(bool invariant) {
  if (!invariant) std::abort();
}

/// What a header that parsed must satisfy, whatever bytes it came from.
void check_header(const attn::npy::detail::Header& header) {
  require(header.ndim == 1 || header.ndim == 2);
  require(header.rows >= 0 && header.cols >= 0);
  require(header.ndim == 2 || header.cols == 1);
  const auto elements = static_cast<std::size_t>(header.rows) * static_cast<std::size_t>(header.cols);
  require(header.cols == 0 || elements / static_cast<std::size_t>(header.cols) == static_cast<std::size_t>(header.rows));
  require(header.data_bytes == elements * attn::npy::detail::item_size(header.dtype));
}

/// A matrix that loaded must survive being written and read again, bit for bit.
template <typename Scalar>
void check_round_trip(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& matrix) {
  std::string bytes;
  attn::npy::detail::write_npy(matrix, [&](const void* data, std::size_t count) {
    bytes.append(static_cast<const char*>(data), count);
  });
  const auto again = attn::npy::load_from_memory<Scalar>(bytes);
  require(again.rows() == matrix.rows() && again.cols() == matrix.cols());
  require(matrix.size() == 0 ||
          std::memcmp(again.data(), matrix.data(), static_cast<std::size_t>(matrix.size()) * sizeof(Scalar)) == 0);
}

template <typename Scalar>
void load(std::string_view file) {
  try {
    check_round_trip<Scalar>(attn::npy::load_from_memory<Scalar>(file));
  } catch (const attn::npy_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);

  // The input as a header dict.
  try {
    check_header(attn::npy::detail::parse_header(input));
  } catch (const attn::npy_error&) {
  }

  // The input as a whole file (the corpus holds valid files to mutate).
  load<double>(input);
  load<float>(input);
  load<Eigen::half>(input);

  // The input as a header dict framed into a version 1.0 file with 24 bytes of data, so
  // that mutated headers reach the data checks and the decoding as well.
  if (size <= 0xffff) {
    std::string file("\x93NUMPY\x01\x00", 8);
    file += static_cast<char>(size & 0xff);
    file += static_cast<char>(size >> 8);
    file.append(input);
    file.append(24, '\x3f');
    load<double>(file);
    load<float>(file);
    load<Eigen::half>(file);
  }
  return 0;
}
