// Must not compile: fixed-size q has 4 columns and k has 3, so q·kᵀ is meaningless. The
// ctest that builds this passes only if the compiler prints attn's static_assert message
// ("q and k must have the same number of columns"), not just any error.

#include <attn/attn.hpp>

int main() {
  const Eigen::Matrix<float, 2, 4> q = Eigen::Matrix<float, 2, 4>::Ones();
  const Eigen::Matrix<float, 5, 3> k = Eigen::Matrix<float, 5, 3>::Ones();
  const auto scores = attn::scaled_scores(q, k, 1.0f);
  return static_cast<int>(scores(0, 0));
}
