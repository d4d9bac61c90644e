// Must not compile: softmax weights are fractions, so integer matrices are refused with
// attn's static_assert ("attn requires a floating-point scalar").

#include <attn/attn.hpp>

int main() {
  const Eigen::MatrixXi scores = Eigen::MatrixXi::Ones(2, 3);
  const auto weights = attn::softmax_rows(scores);
  return weights(0, 0);
}
