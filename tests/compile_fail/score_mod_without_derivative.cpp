// Must not compile: the backward pass needs d score_mod / d score, and a score modifier
// that does not define `derivative` is refused with attn's sentence saying what to add
// ("must also define ... derivative").

#include <attn/attn.hpp>

namespace {

struct DoubledScores {
  template <typename Scalar>
  Scalar operator()(Scalar score, Eigen::Index, Eigen::Index, Eigen::Index) const {
    return 2 * score;
  }
};

}  // namespace

int main() {
  const Eigen::MatrixXf q = Eigen::MatrixXf::Ones(2, 4);
  const auto gradients = attn::flash_attention_backward(q, q, q, attn::Heads{}, q, {}, {},
                                                        attn::Mods{DoubledScores{}, attn::NoMaskMod{}});
  return static_cast<int>(gradients.dq.size());
}
