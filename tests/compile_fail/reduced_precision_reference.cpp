// Must not compile: the reference path computes in its operands' scalar, and Eigen's
// products in bfloat16 accumulate in 16 bits, so 16-bit operands are refused there with
// attn's static_assert pointing at flash_attention, which converts them to float.

#include <attn/attn.hpp>

int main() {
  using Matrix = Eigen::Matrix<attn::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix q = Matrix::Ones(2, 4);
  const auto out = attn::attention(q, q, q);
  return static_cast<int>(static_cast<float>(out(0, 0)));
}
