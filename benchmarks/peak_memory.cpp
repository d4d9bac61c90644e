/// @file
/// One self-attention of N = 16384 tokens, one head, d = 64, in float, through the tiled
/// kernel or the core path, so that `/usr/bin/time -v` can show what each needs at peak:
///
///     /usr/bin/time -v attn_peak_memory flash    # inputs + a few MiB
///     /usr/bin/time -v attn_peak_memory core     # inputs + the N×N weights (1 GiB)
///
/// Usage: attn_peak_memory flash|core [N [d [threads]]]. It prints, as `key: value` lines,
/// the bytes of the inputs (q, k, v), of the output and of the path's scratch, and the
/// process's peak resident set (VmHWM, Linux) before the inputs exist and at the end, so
/// the cost of the run itself can be told from the program's baseline.

#include <cstddef>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

#include <Eigen/Core>

#include <attn/attn.hpp>
#include <attn/flash.hpp>

namespace {

/// The process's peak resident set in bytes, from /proc/self/status; −1 where there is none.
long long peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:  1234 kB"
  }
  return -1;
}

int usage(const char* program) {
  std::cerr << "usage: " << program << " flash|core [N [d [threads]]]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(argv[0]);
  const std::string path = argv[1];
  if (path != "flash" && path != "core") return usage(argv[0]);
  const Eigen::Index n = argc > 2 ? std::atol(argv[2]) : 16384;
  const Eigen::Index d = argc > 3 ? std::atol(argv[3]) : 64;
  const int threads = argc > 4 ? std::atoi(argv[4]) : 1;
  if (n < 1 || d < 1 || threads < 1) return usage(argv[0]);

  const long long baseline = peak_rss_bytes();
  std::srand(12345);
  // q, k, v: (N × d), filled (so resident) before the run
  const Eigen::MatrixXf q = Eigen::MatrixXf::Random(n, d);
  const Eigen::MatrixXf k = Eigen::MatrixXf::Random(n, d);
  const Eigen::MatrixXf v = Eigen::MatrixXf::Random(n, d);
  Eigen::MatrixXf out = Eigen::MatrixXf::Zero(n, d);
  const long long with_inputs = peak_rss_bytes();

  attn::AttentionOptionsf options;
  std::size_t scratch = 0;
  if (path == "flash") {
    Eigen::setNbThreads(1);
    options.num_threads = threads;
    attn::Workspacef workspace;
    attn::flash_attention_into(q, k, v, attn::Heads{1, 1}, options, out, workspace);
    scratch = workspace.bytes();
  } else {
    Eigen::setNbThreads(threads);
    // weights: (N × N), which the core path needs whatever the caller does with them
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> weights(n, n);
    attn::attention_into(q, k, v, options, out, weights);
    scratch = static_cast<std::size_t>(weights.size()) * sizeof(float);
  }

  const std::size_t input_bytes = 3 * static_cast<std::size_t>(n * d) * sizeof(float);
  std::cout << "path: " << path << "\n"
            << "N: " << n << "\nd: " << d << "\nthreads: " << threads << "\n"
            << "input_bytes: " << input_bytes << "\n"
            << "output_bytes: " << static_cast<std::size_t>(out.size()) * sizeof(float) << "\n"
            << "scratch_bytes: " << scratch << "\n"
            << "baseline_peak_rss_bytes: " << baseline << "\n"
            << "with_inputs_peak_rss_bytes: " << with_inputs << "\n"
            << "final_peak_rss_bytes: " << peak_rss_bytes() << "\n"
            << "checksum: " << out.sum() << "\n";
  return 0;
}
