/// @file
/// A PyTorch nn.MultiheadAttention, exported to .npy files, run by attn: load the module's
/// parameters as PyTorch stores them, attend, and print how far attn's output is from
/// PyTorch's.
///
///     torch_parity [DIRECTORY [NUM_HEADS]]
///
/// DIRECTORY holds the module's parameters as the README's "From PyTorch" snippet saves
/// them (in_proj_weight.npy, or q_proj_weight.npy, k_proj_weight.npy and v_proj_weight.npy
/// for a module with kdim/vdim; out_proj_weight.npy; in_proj_bias.npy and out_proj_bias.npy
/// when it has biases), plus the inputs and PyTorch's output of one unmasked call, saved
/// the same way: query.npy, key.npy, value.npy and output.npy (`np.save("output.npy",
/// mha(q, k, v)[0].detach().numpy())`). The default is a fixture committed with attn's
/// tests (made by tests/fixtures/torch/make_torch_fixtures.py), whose config.txt also
/// gives NUM_HEADS. Masks are not this example's business (tests/test_multi_head.cpp runs
/// them): a directory with attn_mask.npy or key_padding_mask.npy is refused.

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <Eigen/Core>

#include <attn/attn.hpp>
#include <attn/npy.hpp>

namespace fs = std::filesystem;

namespace {

Eigen::Index heads_from_config(const fs::path& directory) {
  std::ifstream config(directory / "config.txt");
  std::string key;
  Eigen::Index value = 0;
  while (config >> key >> value) {
    if (key == "num_heads") return value;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path directory = argc > 1 ? fs::path(argv[1]) : fs::path(ATTN_TORCH_FIXTURE);
  const Eigen::Index num_heads = argc > 2 ? std::atoll(argv[2]) : heads_from_config(directory);
  if (num_heads < 1) {
    std::cerr << "usage: torch_parity [DIRECTORY [NUM_HEADS]] (no config.txt in " << directory
              << " to read num_heads from)\n";
    return 2;
  }
  const auto load = [&](const char* name) { return attn::npy::load<float>(directory / (std::string(name) + ".npy")); };
  const bool has_bias = fs::exists(directory / "in_proj_bias.npy");
  const bool separate = fs::exists(directory / "q_proj_weight.npy");
  for (const char* mask : {"attn_mask.npy", "key_padding_mask.npy"}) {
    if (fs::exists(directory / mask)) {
      std::cerr << "torch_parity compares unmasked calls, but " << (directory / mask) << " exists\n";
      return 2;
    }
  }

  try {
    // The module's shape follows from its tensors: out_proj.weight is E×E.
    const Eigen::MatrixXf out_proj_weight = load("out_proj_weight");
    const Eigen::MatrixXf query = load("query");
    const Eigen::MatrixXf key = load("key");
    const Eigen::MatrixXf value = load("value");
    attn::MultiHeadOptions options;
    options.bias = has_bias;
    options.kdim = key.cols();  // PyTorch's kdim and vdim: the widths of the inputs
    options.vdim = value.cols();
    attn::MultiHeadAttentionf module(out_proj_weight.rows(), num_heads, options);
    // PyTorch's None biases are empty matrices here.
    const Eigen::MatrixXf in_proj_bias = has_bias ? load("in_proj_bias") : Eigen::MatrixXf();
    const Eigen::MatrixXf out_proj_bias = has_bias ? load("out_proj_bias") : Eigen::MatrixXf();
    if (separate) {
      module.load_torch(load("q_proj_weight"), load("k_proj_weight"), load("v_proj_weight"), in_proj_bias,
                        out_proj_weight, out_proj_bias);
    } else {
      module.load_torch(load("in_proj_weight"), in_proj_bias, out_proj_weight, out_proj_bias);
    }

    const Eigen::MatrixXf output = module.forward(query, key, value);
    const Eigen::MatrixXf expected = load("output");

    const float difference = (output - expected).cwiseAbs().maxCoeff();
    std::cout << "module: embed_dim " << module.embed_dim() << ", " << module.num_heads() << " heads, "
              << (has_bias ? "with" : "without") << " bias\n"
              << "query " << query.rows() << "x" << query.cols() << ", key " << key.rows() << "x" << key.cols()
              << " (" << directory.string() << ")\n"
              << "max |attn - PyTorch| = " << difference << " (largest output entry "
              << expected.cwiseAbs().maxCoeff() << ")\n";
    // Float against float: a few units in the last place of the output, not more.
    return difference <= 1e-5f * std::max(1.0f, expected.cwiseAbs().maxCoeff()) ? EXIT_SUCCESS : EXIT_FAILURE;
  } catch (const std::exception& error) {
    std::cerr << error.what() << '\n';
    return EXIT_FAILURE;
  }
}
