/// @file
/// Self-attention in float, three ways on the same shapes, at one thread and at all threads:
///
/// - `core`:  the reference path, `attn::attention_into` once per head on column blocks of
///            the n×(H·d) inputs, with one reusable n×n weights buffer (scores, masked,
///            softmaxed in place, then P·V). Threads: `Eigen::setNbThreads(t)` (its two
///            GEMMs run on t threads; the mask and softmax run on one).
/// - `flash`: the tiled kernel, `attn::flash_attention_into` with the heads side by side
///            (`attn::Heads{H, H}`) and one reused `attn::Workspace`. Threads:
///            `options.num_threads = t`, with `Eigen::setNbThreads(1)` so that Eigen never
///            tries to split a tile product across threads itself.
/// - `flash_bf16`, `flash_half`: `flash` with q, k and v stored in 16 bits (N ≥ 1024),
///            computing in float.
/// - `gemm`:  for each head, the two Eigen products the attention is made of, (n×d)·(d×n)
///            into an n×n buffer and (n×n)·(n×d), with nothing in between: the practical
///            peak of this machine for these FLOPs. Threads: `Eigen::setNbThreads(t)`.
///
/// and `decode`: one new query (n_q = 1) over a KV cache of n_k keys, causal, flash path,
/// reporting the rate at which K and V are read.
///
/// Two square n×n×n products, n = 1024 and 2048, c = a·b, column-major (`GFLOP/s`: 2·n³):
///
/// - `openblas_sgemm`: OpenBLAS's `cblas_sgemm` (built with `ATTN_BENCHMARK_OPENBLAS`, when
///            CMake found OpenBLAS): the machine's practical peak for single-precision
///            FLOPs. Eigen's GEMM is not: on a Zen 3 AVX2 core it reached about half of it.
///            Threads: `openblas_set_num_threads(t)`.
/// - `eigen_sgemm`: the same product with Eigen, to set the two peaks side by side in one
///            run. Threads: `Eigen::setNbThreads(t)`.
///
/// Benchmark names carry their arguments: `flash/d:64/H:8/N:1024/causal:1/threads:2/real_time`.
/// Cases of one shape are registered next to each other (gemm, core, flash, at each thread
/// count), so ratios between them compare runs made within seconds of each other on a
/// noisy machine. All times are wall-clock (`UseRealTime`): a threaded run must not be
/// rated by the CPU time of its main thread.
///
/// Counters: `GFLOP/s` (see `attention_flops`), `scratch_bytes` (the peak scratch the case
/// needs besides its inputs and output), `tiles` (flash: score tiles computed per call),
/// `GB/s` (decode: K and V bytes read per second).
///
/// Extra flag (besides Google Benchmark's): `--attn_max_n=N` registers only the shapes
/// with N (or the decode cache length) ≤ N, for a quick run.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <attn/attn.hpp>
#include <attn/flash.hpp>

#include "bench_common.hpp"

#if defined(ATTN_BENCHMARK_OPENBLAS)
#include <cblas.h>  // OpenBLAS's own, which declares openblas_set_num_threads
#endif

namespace {

using attn_bench::LoadProbe;
using attn_bench::set_rate;
using attn_bench::take_max_n;
using attn_bench::thread_counts;

using Matrix = Eigen::MatrixXf;  // column-major, as a projection x·W produces
using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// q: n_q×cols, k and v: n_k×cols, uniform in [−1, 1] from a fixed seed.
struct Inputs {
  Matrix q;
  Matrix k;
  Matrix v;
};

/// The inputs of the last shape asked for. Google Benchmark calls a benchmark function
/// several times (once per trial iteration count), and filling 3 × 8192 × 1024 floats
/// every time would dominate a run; holding one shape at a time bounds the memory.
const Inputs& inputs_for(Eigen::Index n_q, Eigen::Index n_k, Eigen::Index cols) {
  static std::tuple<Eigen::Index, Eigen::Index, Eigen::Index> key{-1, -1, -1};
  static Inputs inputs;
  if (key != std::make_tuple(n_q, n_k, cols)) {
    inputs = Inputs{};  // free the previous shape first
    std::srand(12345);
    inputs.q = Matrix::Random(n_q, cols);
    inputs.k = Matrix::Random(n_k, cols);
    inputs.v = Matrix::Random(n_k, cols);
    key = std::make_tuple(n_q, n_k, cols);
  }
  return inputs;
}

/// FLOPs of one self-attention call: Q·Kᵀ is 2·N²·d multiply-adds per head and P·V another
/// 2·N²·d, so 4·H·N²·d; the softmax's exponentials are not counted. A causal call counts
/// half, 2·H·N²·d, for EVERY implementation, whether it skips the masked half (flash skips
/// the tiles above the diagonal) or computes and then masks it (core, and torch's naive
/// path in compare_torch.py): the counter measures useful work per second, so a path that
/// wastes the masked half shows it as a lower GFLOP/s. The gemm reference has no causal
/// variant (its products are the same either way).
double attention_flops(Eigen::Index heads, Eigen::Index n, Eigen::Index d, bool causal) {
  const double full = 4.0 * static_cast<double>(heads) * static_cast<double>(n) * static_cast<double>(n) *
                      static_cast<double>(d);
  return causal ? full / 2.0 : full;
}

void set_scratch(benchmark::State& state, double bytes) { attn_bench::set_bytes(state, "scratch_bytes", bytes); }

struct Shape {
  Eigen::Index d;
  Eigen::Index heads;
  Eigen::Index n;
  bool causal;
  int threads;
};

/// Arguments, in the order of `shape_arg_names`.
Shape shape_of(const benchmark::State& state) {
  return Shape{state.range(0), state.range(1), state.range(2), state.range(3) != 0, static_cast<int>(state.range(4))};
}

void BM_core(benchmark::State& state) {
  const Shape shape = shape_of(state);
  const Eigen::Index d = shape.d;
  const Inputs& in = inputs_for(shape.n, shape.n, shape.heads * d);
  Eigen::setNbThreads(shape.threads);
  attn::AttentionOptionsf options;
  options.causal = shape.causal;
  // out: (N × H·d); weights: (N × N), row-major as attn::attention allocates it, reused by
  // every head. Touched once here so that no timed iteration pays its page faults.
  Matrix out = Matrix::Zero(shape.n, shape.heads * d);
  RowMajorMatrix weights = RowMajorMatrix::Zero(shape.n, shape.n);
  const LoadProbe probe;
  for (auto _ : state) {
    for (Eigen::Index head = 0; head < shape.heads; ++head) {
      attn::attention_into(in.q.middleCols(head * d, d), in.k.middleCols(head * d, d), in.v.middleCols(head * d, d),
                           options, out.middleCols(head * d, d), weights);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(weights.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", attention_flops(shape.heads, shape.n, d, shape.causal) * 1e-9);
  set_scratch(state, static_cast<double>(weights.size()) * sizeof(float));
}

/// q, k and v stored as `Storage`: float, or 16 bits (`flash_bf16`, `flash_half`),
/// converted once outside the timed loop, as a model that keeps its activations in 16 bits
/// has them; the kernel's own conversion of each tile is timed.
template <typename Storage>
void BM_flash(benchmark::State& state) {
  const Shape shape = shape_of(state);
  const Eigen::Index d = shape.d;
  const Inputs& in = inputs_for(shape.n, shape.n, shape.heads * d);
  const auto stored = [](const Matrix& m) -> decltype(auto) {
    if constexpr (std::is_same_v<Storage, float>) {
      return (m);
    } else {
      return Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic>(m.cast<Storage>());
    }
  };
  const auto& q = stored(in.q);
  const auto& k = stored(in.k);
  const auto& v = stored(in.v);
  // The kernel's threads are its own; Eigen must not also split each small tile product.
  Eigen::setNbThreads(1);
  attn::AttentionOptionsf options;
  options.causal = shape.causal;
  options.num_threads = shape.threads;
  // out: (N × H·d), heads side by side as in the inputs
  Matrix out = Matrix::Zero(shape.n, shape.heads * d);
  attn::Workspacef workspace;
  const attn::Heads heads{shape.heads, shape.heads};
  const LoadProbe probe;
  for (auto _ : state) {
    attn::flash_attention_into(q, k, v, heads, options, out, workspace);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", attention_flops(shape.heads, shape.n, d, shape.causal) * 1e-9);
  set_scratch(state, static_cast<double>(workspace.bytes()));
  state.counters["tiles"] = static_cast<double>(workspace.tiles_computed());
}

/// The tiled backward pass (dq, dk, dv from d_out), given the forward's out and lse as a
/// training step has them. GFLOP/s counts the backward's useful work as FlashAttention's
/// papers do, 2.5× the forward's (5 products of its 2); attn's deterministic two passes do
/// 7, so time against `flash` of the same shape is the ratio to read.
void BM_backward(benchmark::State& state) {
  const Shape shape = shape_of(state);
  const Eigen::Index d = shape.d;
  const Inputs& in = inputs_for(shape.n, shape.n, shape.heads * d);
  Eigen::setNbThreads(1);
  attn::AttentionOptionsf options;
  options.causal = shape.causal;
  options.num_threads = shape.threads;
  const attn::Heads heads{shape.heads, shape.heads};
  Matrix out = Matrix::Zero(shape.n, shape.heads * d), lse = Matrix::Zero(shape.n, shape.heads);
  attn::Workspacef forward_workspace;
  attn::flash_attention_into(in.q, in.k, in.v, heads, options, out, lse, forward_workspace);
  // d_out: any matrix of the output's shape; the inputs' v has it.
  const auto& d_out = in.v;
  attn::BackwardInputs<float> kept;
  kept.out = out;
  kept.lse = lse;
  attn::BackwardWorkspacef workspace;
  attn::AttentionGradients<float> gradients;
  const LoadProbe probe;
  for (auto _ : state) {
    attn::flash_attention_backward_into(in.q, in.k, in.v, heads, options, d_out, gradients, workspace, kept);
    benchmark::DoNotOptimize(gradients.dq.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", 2.5 * attention_flops(shape.heads, shape.n, d, shape.causal) * 1e-9);
  set_scratch(state, static_cast<double>(workspace.bytes()));
}

/// The same products as attention with nothing in between: as fast as Eigen multiplies
/// these shapes here.
void BM_gemm(benchmark::State& state) {
  const Shape shape = shape_of(state);
  const Eigen::Index d = shape.d;
  const Inputs& in = inputs_for(shape.n, shape.n, shape.heads * d);
  Eigen::setNbThreads(shape.threads);
  Matrix out = Matrix::Zero(shape.n, shape.heads * d);
  Matrix scores = Matrix::Zero(shape.n, shape.n);
  const LoadProbe probe;
  for (auto _ : state) {
    for (Eigen::Index head = 0; head < shape.heads; ++head) {
      // scores: (N × d)·(d × N) → (N × N); out head: (N × N)·(N × d) → (N × d)
      scores.noalias() = in.q.middleCols(head * d, d) * in.k.middleCols(head * d, d).transpose();
      out.middleCols(head * d, d).noalias() = scores * in.v.middleCols(head * d, d);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", attention_flops(shape.heads, shape.n, d, false) * 1e-9);
  set_scratch(state, static_cast<double>(scores.size()) * sizeof(float));
}

/// FLOPs of one square n×n×n product: n² sums of n products.
double square_gemm_flops(Eigen::Index n) {
  const double size = static_cast<double>(n);
  return 2.0 * size * size * size;
}

/// c = a·b, all n×n: as fast as Eigen multiplies a large square product here.
void BM_eigen_sgemm(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  // a, b: (n × n), the q and k of an n×n input set
  const Inputs& in = inputs_for(n, n, n);
  Eigen::setNbThreads(static_cast<int>(state.range(1)));
  Matrix c = Matrix::Zero(n, n);
  const LoadProbe probe;
  for (auto _ : state) {
    // c: (n × n)·(n × n) → (n × n)
    c.noalias() = in.q * in.k;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", square_gemm_flops(n) * 1e-9);
}

#if defined(ATTN_BENCHMARK_OPENBLAS)
/// The same product through OpenBLAS: the practical peak of this machine for float FLOPs,
/// which the tiled kernel is measured against (Eigen's reached about half of it on Zen 3).
void BM_openblas_sgemm(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const Inputs& in = inputs_for(n, n, n);
  // OpenBLAS's own thread pool, apart from OpenMP's and Eigen's: every case sets its count.
  openblas_set_num_threads(static_cast<int>(state.range(1)));
  Matrix c = Matrix::Zero(n, n);
  const auto size = static_cast<blasint>(n);
  const LoadProbe probe;
  for (auto _ : state) {
    // c: (n × n)·(n × n) → (n × n), column-major, leading dimension n
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, size, size, size, 1.0f, in.q.data(), size, in.k.data(),
                size, 0.0f, c.data(), size);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "GFLOP/s", square_gemm_flops(n) * 1e-9);
}
#endif

/// Decoding: the newest token's query against the whole cache (causal, bottom-right
/// aligned, so it sees every key). With one query block the kernel splits the keys into
/// chunks and merges them, which is what lets two threads share one query.
void BM_decode(benchmark::State& state) {
  const Eigen::Index d = state.range(0);
  const Eigen::Index num_heads = state.range(1);
  const Eigen::Index n_k = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const Inputs& in = inputs_for(1, n_k, num_heads * d);
  Eigen::setNbThreads(1);
  attn::AttentionOptionsf options;
  options.causal = true;
  options.num_threads = threads;
  Matrix out = Matrix::Zero(1, num_heads * d);
  attn::Workspacef workspace;
  const attn::Heads heads{num_heads, num_heads};
  const LoadProbe probe;
  for (auto _ : state) {
    attn::flash_attention_into(in.q, in.k, in.v, heads, options, out, workspace);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  // K and V are each n_k × (H·d) floats, read once per call.
  const double bytes = 2.0 * static_cast<double>(num_heads * n_k * d) * sizeof(float);
  set_rate(state, "GB/s", bytes * 1e-9);
  set_rate(state, "GFLOP/s", attention_flops(num_heads, 1, d, false) * static_cast<double>(n_k) * 1e-9);
  set_scratch(state, static_cast<double>(workspace.bytes()));
}

const std::vector<std::string> shape_arg_names{"d", "H", "N", "causal", "threads"};

/// Milliseconds and wall-clock time for every case. The run stays bounded without per-case
/// settings: Google Benchmark's default 0.5 s minimum holds for the small shapes, and a big
/// one stops after its first iteration, which already exceeds it (about 2 s for the
/// slowest, core at d = 128, N = 8192, H = 8).
benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* benchmark, int repetitions = 1) {
  benchmark->Unit(benchmark::kMillisecond)->UseRealTime();
  // The JSON keeps every repetition and their median; the console shows the aggregates.
  if (repetitions > 1) benchmark->Repetitions(repetitions)->DisplayAggregatesOnly(true);
  return benchmark;
}

/// The shapes the targets read (d = 64, H = 8, N ≥ 1024) run three times and
/// report medians: a cache-resident GEMM on a shared host varies by 25 % from one run to
/// the next (other tenants share the L3), more than the ratios' margins. About a minute.
int repetitions_for(Eigen::Index d, Eigen::Index num_heads, Eigen::Index n) {
  return d == 64 && num_heads == 8 && n >= 1024 ? 3 : 1;
}

void register_attention(Eigen::Index d, Eigen::Index num_heads, Eigen::Index n) {
  const int repetitions = repetitions_for(d, num_heads, n);
  for (const int causal : {0, 1}) {
    for (const int threads : thread_counts()) {
      const std::vector<std::int64_t> args{d, num_heads, n, causal, threads};
      // gemm has no causal variant: it is registered once per shape and thread count.
      if (causal == 0) {
        configure(benchmark::RegisterBenchmark("gemm", BM_gemm)->ArgNames(shape_arg_names)->Args(args), repetitions);
      }
      configure(benchmark::RegisterBenchmark("core", BM_core)->ArgNames(shape_arg_names)->Args(args), repetitions);
      configure(benchmark::RegisterBenchmark("flash", BM_flash<float>)->ArgNames(shape_arg_names)->Args(args),
                repetitions);
      if (n >= 1024) {
        configure(benchmark::RegisterBenchmark("flash_bf16", BM_flash<attn::bfloat16>)
                      ->ArgNames(shape_arg_names)
                      ->Args(args),
                  repetitions);
        configure(benchmark::RegisterBenchmark("flash_half", BM_flash<attn::half>)
                      ->ArgNames(shape_arg_names)
                      ->Args(args),
                  repetitions);
      }
      if (n <= 4096) {
        configure(benchmark::RegisterBenchmark("backward", BM_backward)->ArgNames(shape_arg_names)->Args(args),
                  repetitions);
      }
    }
  }
}

/// The square GEMM peaks, OpenBLAS (when built with it) and Eigen, at each n and thread
/// count. Three repetitions, as the shapes the targets compare them with.
void register_peaks(std::int64_t max_n) {
  for (const std::int64_t n : {1024, 2048}) {
    if (n > max_n) continue;
    for (const int threads : thread_counts()) {
#if defined(ATTN_BENCHMARK_OPENBLAS)
      configure(benchmark::RegisterBenchmark("openblas_sgemm", BM_openblas_sgemm)
                    ->ArgNames({"n", "threads"})
                    ->Args({n, threads}),
                3);
#endif
      configure(benchmark::RegisterBenchmark("eigen_sgemm", BM_eigen_sgemm)
                    ->ArgNames({"n", "threads"})
                    ->Args({n, threads}),
                3);
    }
  }
}

void register_all(std::int64_t max_n) {
  for (const Eigen::Index d : {64, 128}) {
    for (const Eigen::Index n : {128, 256, 512, 1024, 2048, 4096, 8192}) {
      // The peaks run just before the first shape the targets set against them (d = 64,
      // N = 1024), for the reason above: seconds from flash's cases, not minutes; the
      // d = 128 rows compare with the same measurement, a few minutes older.
      if (d == 64 && n == 1024) register_peaks(max_n);
      if (n <= max_n) register_attention(d, 8, n);
    }
    // One head at 16k: 1 GiB of n×n weights for the core path.
    if (16384 <= max_n) register_attention(d, 1, 16384);
  }
  for (const std::int64_t n_k : {1024, 2048, 4096, 8192, 16384, 32768, 65536}) {
    if (n_k > max_n) continue;
    for (const int threads : thread_counts()) {
      configure(benchmark::RegisterBenchmark("decode", BM_decode)
                    ->ArgNames({"d", "H", "n_k", "threads"})
                    ->Args({64, 8, n_k, threads}));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t max_n = take_max_n(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  attn_bench::add_common_context();
#if defined(ATTN_BENCHMARK_OPENBLAS)
  // Which kernels OpenBLAS chose for this CPU: Debian's build picks them at run time.
  benchmark::AddCustomContext("openblas_config", openblas_get_config());
  benchmark::AddCustomContext("openblas_corename", openblas_get_corename());
#endif
  register_all(max_n);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
