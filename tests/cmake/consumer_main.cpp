// The smallest useful attn program: a row softmax whose rows must each sum to 1. Both
// consumer projects (find_package/ and add_subdirectory/) build this one file.
#include <attn/attn.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <string>

int main() {
  Eigen::MatrixXd m(2, 3);
  m << 1.0, 2.0, 3.0,
      -1.0, 0.0, 1000.0;
  const Eigen::MatrixXd p = attn::softmax_rows(m);
  if (p.rows() != 2 || p.cols() != 3) {
    std::fprintf(stderr, "softmax_rows returned %ldx%ld, expected 2x3\n",
                 static_cast<long>(p.rows()), static_cast<long>(p.cols()));
    return 1;
  }
  for (Eigen::Index i = 0; i < p.rows(); ++i) {
    const double sum = p.row(i).sum();
    if (!(std::abs(sum - 1.0) <= 1e-12)) {
      std::fprintf(stderr, "row %ld of softmax_rows sums to %.17g, expected 1\n",
                   static_cast<long>(i), sum);
      return 1;
    }
  }
#ifdef ATTN_CONSUMER_PACKAGE_VERSION
  // Set by the find_package consumer: the package's version must be the header's.
  const std::string header_version = std::to_string(attn::version_major) + "." +
                                     std::to_string(attn::version_minor) + "." +
                                     std::to_string(attn::version_patch);
  if (header_version != ATTN_CONSUMER_PACKAGE_VERSION) {
    std::fprintf(stderr, "find_package found attn %s, but its version.hpp says %s\n",
                 ATTN_CONSUMER_PACKAGE_VERSION, header_version.c_str());
    return 1;
  }
  std::printf("attn consumer: package and header are both version %s\n", header_version.c_str());
#endif
  std::printf("attn consumer: softmax rows sum to 1\n");
  return 0;
}
