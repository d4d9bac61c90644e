/// @file
/// The core path, `attn::attention_into` (scores, mask, softmax, weighted sum with the
/// n×n weight matrix materialised), against the two Eigen GEMMs of the same FLOPs, which
/// is as fast as this machine multiplies these shapes. Also the softmax on its own.
///
/// Sizes: n = n_q = n_k in {64 … 1024}, d = d_k = d_v = 64, float and double. Buffers are
/// allocated once outside the timed loop and reused, as a caller running a model would.

#include <cstddef>
#include <cstdint>
#include <random>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <attn/attn.hpp>

namespace {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// Standard normal entries from a fixed seed, filled in a fixed order.
template <typename Scalar>
Matrix<Scalar> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<Scalar> normal(Scalar(0), Scalar(1));
  Matrix<Scalar> matrix(rows, cols);
  for (Eigen::Index col = 0; col < cols; ++col) {
    for (Eigen::Index row = 0; row < rows; ++row) matrix(row, col) = normal(rng);
  }
  return matrix;
}

/// Q·Kᵀ is 2·n·n·d flops and P·V another 2·n·n·d; the softmax's n² exponentials are not
/// counted. The causal case is counted the same: the core path computes the full n×n
/// score matrix and then masks it, so it does the same multiplications (a path that skips
/// the masked half would count 2·n²·d).
double attention_flops(Eigen::Index n, Eigen::Index d) {
  return 4.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(d);
}

void set_flop_rate(benchmark::State& state, double flops_per_iteration) {
  // kIsRate divides by the run's time, so the counter holds the total over all iterations.
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops_per_iteration * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

template <typename Scalar>
void BM_attention_into(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const Eigen::Index d = state.range(1);
  const bool causal = state.range(2) != 0;
  // q, k: (n × d); v: (n × d)
  const Matrix<Scalar> q = random_matrix<Scalar>(n, d, 1);
  const Matrix<Scalar> k = random_matrix<Scalar>(n, d, 2);
  const Matrix<Scalar> v = random_matrix<Scalar>(n, d, 3);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;
  // out: (n × d), weights: (n × n), sized here so that the loop never allocates
  Matrix<Scalar> out(n, d);
  Matrix<Scalar> weights(n, n);
  for (auto _ : state) {
    attn::attention_into(q, k, v, options, out, weights);
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(weights.data());
    benchmark::ClobberMemory();
  }
  set_flop_rate(state, attention_flops(n, d));
  state.counters["scratch_bytes"] = benchmark::Counter(static_cast<double>(n * n) * sizeof(Scalar),
                                                       benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

/// The same two products with nothing in between: the practical peak for attention_into.
template <typename Scalar>
void BM_gemm_reference(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const Eigen::Index d = state.range(1);
  const Matrix<Scalar> q = random_matrix<Scalar>(n, d, 1);
  const Matrix<Scalar> k = random_matrix<Scalar>(n, d, 2);
  const Matrix<Scalar> v = random_matrix<Scalar>(n, d, 3);
  Matrix<Scalar> out(n, d);
  Matrix<Scalar> scores(n, n);
  for (auto _ : state) {
    // scores: (n × d)·(d × n) → (n × n); out: (n × n)·(n × d) → (n × d)
    scores.noalias() = q * k.transpose();
    out.noalias() = scores * v;
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  set_flop_rate(state, attention_flops(n, d));
  state.counters["scratch_bytes"] = benchmark::Counter(static_cast<double>(n * n) * sizeof(Scalar),
                                                       benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

template <typename Scalar>
void BM_softmax_rows_inplace(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  // Scores of the spread a 1/√d-scaled attention produces. The loop applies the softmax to
  // its own output rather than restoring the input, which would time a copy too: the
  // cost of max, exp, sum and divide does not depend on the values.
  Matrix<Scalar> scores = random_matrix<Scalar>(n, n, 4);
  for (auto _ : state) {
    attn::softmax_rows_inplace(scores);
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  // One item per score; the matrix is read and written once per pass.
  state.SetItemsProcessed(state.iterations() * n * n);
  state.SetBytesProcessed(state.iterations() * n * n * static_cast<std::int64_t>(2 * sizeof(Scalar)));
}

constexpr std::int64_t d_head = 64;

void attention_sizes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n", "d", "causal"})->ArgsProduct({{64, 128, 256, 512, 1024}, {d_head}, {0, 1}});
}

void gemm_sizes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n", "d"})->ArgsProduct({{64, 128, 256, 512, 1024}, {d_head}});
}

void softmax_sizes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n"})->RangeMultiplier(2)->Range(64, 1024);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_attention_into, float)->Apply(attention_sizes);
BENCHMARK_TEMPLATE(BM_attention_into, double)->Apply(attention_sizes);
BENCHMARK_TEMPLATE(BM_gemm_reference, float)->Apply(gemm_sizes);
BENCHMARK_TEMPLATE(BM_gemm_reference, double)->Apply(gemm_sizes);
BENCHMARK_TEMPLATE(BM_softmax_rows_inplace, float)->Apply(softmax_sizes);
BENCHMARK_TEMPLATE(BM_softmax_rows_inplace, double)->Apply(softmax_sizes);

BENCHMARK_MAIN();
