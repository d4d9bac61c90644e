/// @file
/// `attn::MultiHeadAttention` in float, embed_dim E = 512 and H = 8 heads of d = 64, as
/// multi-head attention (`mha`: 8 key/value heads) and grouped-query attention (`gqa`: 2
/// key/value heads, Ainslie et al. 2023), at one thread and at all threads:
///
/// - `mha_forward/<kind>`: self-attention of N tokens (query = key = value = x), the four
///   projections with biases and the tiled kernel between them, N = 128 … 4096, causal and
///   not. Threads: `options.num_threads = t` for the kernel and `Eigen::setNbThreads(t)`
///   for the projections' GEMMs (restored afterwards).
/// - `decode/<kind>`: one decode step (one new token) over a `KVCache` already holding L
///   tokens, L = 256 … 16384, and 65536, where GQA's cache (64 MiB) no longer fits the
///   32 MiB L3 of the reference machine either. The cache is filled once; every iteration
///   runs one step (which appends the token's key and value) and `truncate(L)` rolls it
///   back, so every iteration sees the same L. A step is memory-bound: it reads the
///   cache's keys and values and the four projection weights and does a few FLOPs per
///   float read (2 per key or value for MHA, 8 for GQA's shared heads).
/// - `decode_bf16/<kind>`, `decode_half/<kind>`, `decode_q8/<kind>`: the same step over a
///   cache stored in 16 bits (`make_cache<attn::bfloat16>`, `<attn::half>`: half the bytes
///   to read) or in q8_0 (`make_cache<attn::q8_0>`: 34 bytes per 32 values), each row
///   converted to float in registers as the kernel reads it.
/// - `copy` and `read`: the machine's memory bandwidth in the same run, on buffers of
///   1 MiB … 256 MiB (the decode steps' working sets span 2.7 … 260 MiB), to compare the
///   decode steps' GB/s with: `copy` is std::memcpy, `read` sums the buffer (reads only,
///   as a decode step does).
///
/// Names carry the arguments: `mha_forward/gqa/N:1024/causal:1/threads:2/repeats:3/real_time`,
/// `decode/mha/cache:4096/threads:1/…`, `copy/bytes:67108864/threads:2/…`.
/// Cases that are compared are registered next to each other (mha then gqa at each shape
/// and thread count; the bandwidth cases just before the decode cases). All times are
/// wall-clock (`UseRealTime`).
///
/// Counters:
/// - `tokens/s`: tokens processed per second (N per forward call, 1 per decode step).
/// - `GFLOP/s` (forward): 2·N·E·(E + 2·H_kv·d) for the input projections, 2·N·E·E for the
///   output projection and 4·N²·E for the attention (Q·Kᵀ and P·V over all H heads; half
///   for causal, as in bench_attention.cpp: useful work), per second.
/// - `attn_share` (forward): the fraction of a call spent in the attention kernel rather
///   than the projections, from timing the two parts separately (the same Eigen products
///   and kernel call `forward_into` makes, through the module's public weights) once per
///   case, after its first timed loop.
/// - `kv_GB/s` (decode): the cache's keys and values read per step, (L + 1)·2·H_kv·d·4
///   bytes (·2 in 16 bits; the new token's row included), per second; `total_GB/s` adds
///   the projection weights and biases, (2·E·E + 2·E·H_kv·d + 2·E + 2·H_kv·d)·4 bytes
///   (4 MiB for mha, 2.5 MiB for gqa), each read once per step. Both count distinct bytes: the kernel reads
///   a GQA key/value head once per query head sharing it (4 times), from the L3 while the
///   head fits there and from memory beyond (benchmarks/README.md has the measurements).
/// - `read_GB/s` (copy, read): bytes read per second. A copy also writes as many bytes
///   (and, below glibc's non-temporal threshold, reads the destination lines first), so
///   its bus traffic is 2 to 3 times `read_GB/s`; a decode step only reads, which makes
///   `read` the closer comparison and `copy` the conventional one.
/// - `kv_bytes`, `weight_bytes` (decode), `bytes` (copy, read), `scratch_bytes`
///   (the workspace), `other_cpus` (CPUs other processes kept busy during the timed loop,
///   from /proc/stat, as in bench_attention.cpp).
///
/// Extra flag (besides Google Benchmark's): `--attn_max_n=N` registers only the forward
/// shapes with N ≤ N and the decode steps with L ≤ N, for a quick run.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <attn/attn.hpp>

#include "bench_common.hpp"

namespace {

using attn_bench::LoadProbe;
using attn_bench::set_rate;
using attn_bench::take_max_n;
using attn_bench::thread_counts;
using attn_bench::set_bytes;

using Matrix = Eigen::MatrixXf;

constexpr Eigen::Index embed_dim = 512;
constexpr Eigen::Index num_heads = 8;

/// The two kinds compared: multi-head (every query head has its own keys and values) and
/// grouped-query attention with groups of 4 query heads.
struct Kind {
  const char* name;
  Eigen::Index num_kv_heads;
};
constexpr Kind kinds[] = {{"mha", 8}, {"gqa", 2}};

/// A module of each kind with random weights and biases from a fixed seed, built once.
/// The weights are scaled by 1/√E so that activations stay of order one.
const attn::MultiHeadAttentionf& module_for(Eigen::Index num_kv_heads) {
  static std::map<Eigen::Index, std::unique_ptr<attn::MultiHeadAttentionf>> modules;
  auto& module = modules[num_kv_heads];
  if (!module) {
    attn::MultiHeadOptions shape;
    shape.num_kv_heads = num_kv_heads;
    shape.bias = true;
    module = std::make_unique<attn::MultiHeadAttentionf>(embed_dim, num_heads, shape);
    const Eigen::Index kv_width = module->kv_width();
    const float scale = 1.0f / std::sqrt(static_cast<float>(embed_dim));
    std::srand(static_cast<unsigned>(1000 + num_kv_heads));
    module->set_weights(scale * Matrix::Random(embed_dim, embed_dim), scale * Matrix::Random(embed_dim, kv_width),
                        scale * Matrix::Random(embed_dim, kv_width), scale * Matrix::Random(embed_dim, embed_dim));
    module->set_biases(0.1f * Eigen::RowVectorXf::Random(embed_dim), 0.1f * Eigen::RowVectorXf::Random(kv_width),
                       0.1f * Eigen::RowVectorXf::Random(kv_width), 0.1f * Eigen::RowVectorXf::Random(embed_dim));
  }
  return *module;
}

/// The tokens x (n×E, uniform in [−1, 1], fixed seed) of the last length asked for: one
/// length at a time, since Google Benchmark calls a case's function several times.
const Matrix& tokens_for(Eigen::Index n) {
  static Eigen::Index held = -1;
  static Matrix tokens;
  if (held != n) {
    std::srand(12345);
    tokens = Matrix::Random(n, embed_dim);
    held = n;
  }
  return tokens;
}

/// Sets Eigen's own thread count (its GEMMs, here the projections) for a scope, and
/// restores the previous one.
class EigenThreads {
 public:
  explicit EigenThreads(int threads) : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(threads); }
  ~EigenThreads() { Eigen::setNbThreads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---------------------------------------------------------------------------------------
// Forward

/// FLOPs of one self-attention forward of n tokens: the Q, K and V projections
/// (2·n·E·(E + 2·H_kv·d)), the output projection (2·n·E·E) and the attention, 4·n²·E over
/// all heads (2·n²·d for Q·Kᵀ and as much for P·V, per head), half of it when causal. The
/// biases and the softmax's exponentials are not counted.
double forward_flops(Eigen::Index n, Eigen::Index kv_width, bool causal) {
  const double n_ = static_cast<double>(n);
  const double e = static_cast<double>(embed_dim);
  const double projections = 2.0 * n_ * e * (e + 2.0 * static_cast<double>(kv_width)) + 2.0 * n_ * e * e;
  const double attention = 4.0 * n_ * n_ * e;
  return projections + (causal ? attention / 2.0 : attention);
}

/// The fraction of a forward call spent in the attention kernel: the projections (the
/// products and bias additions `forward_into` makes) and the kernel timed apart, over the
/// same inputs, alternately, for about 0.2 s (at least twice each).
double attention_share(const attn::MultiHeadAttentionf& module, const Matrix& x,
                       const attn::AttentionOptionsf& options) {
  const Eigen::Index n = x.rows();
  Matrix queries(n, embed_dim), keys(n, module.kv_width()), values(n, module.kv_width());
  Matrix context(n, embed_dim), out(n, embed_dim);
  attn::Workspacef workspace;
  const attn::Heads heads{module.num_heads(), module.num_kv_heads()};
  const auto project_in = [&] {
    // queries: (n × E), keys and values: (n × H_kv·d)
    queries.noalias() = x * module.query_weight();
    queries.rowwise() += module.query_bias();
    keys.noalias() = x * module.key_weight();
    keys.rowwise() += module.key_bias();
    values.noalias() = x * module.value_weight();
    values.rowwise() += module.value_bias();
  };
  const auto project_out = [&] {
    // out: (n × E)
    out.noalias() = context * module.output_weight();
    out.rowwise() += module.output_bias();
  };
  double projection_seconds = 0.0;
  double attention_seconds = 0.0;
  const auto begin = std::chrono::steady_clock::now();
  for (int round = 0; round < 2 || seconds_since(begin) < 0.2; ++round) {
    auto start = std::chrono::steady_clock::now();
    project_in();
    project_out();
    benchmark::DoNotOptimize(out.data());
    projection_seconds += round > 0 ? seconds_since(start) : 0.0;  // round 0 warms up
    start = std::chrono::steady_clock::now();
    attn::flash_attention_into(queries, keys, values, heads, options, context, workspace);
    benchmark::DoNotOptimize(context.data());
    attention_seconds += round > 0 ? seconds_since(start) : 0.0;
  }
  return attention_seconds / (attention_seconds + projection_seconds);
}

void BM_forward(benchmark::State& state, Eigen::Index num_kv_heads) {
  const Eigen::Index n = state.range(0);
  const bool causal = state.range(1) != 0;
  const int threads = static_cast<int>(state.range(2));
  const attn::MultiHeadAttentionf& module = module_for(num_kv_heads);
  const Matrix& x = tokens_for(n);
  const EigenThreads eigen_threads(threads);
  attn::AttentionOptionsf options;
  options.causal = causal;
  options.num_threads = threads;
  // out: (n × E); one call before the timed loop sizes the workspace and touches both
  Matrix out = Matrix::Zero(n, embed_dim);
  attn::MultiHeadWorkspacef workspace;
  module.forward_into(x, x, x, options, out, workspace);
  const LoadProbe probe;
  for (auto _ : state) {
    module.forward_into(x, x, x, options, out, workspace);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "tokens/s", static_cast<double>(n));
  set_rate(state, "GFLOP/s", forward_flops(n, module.kv_width(), causal) * 1e-9);
  set_bytes(state, "scratch_bytes", static_cast<double>(workspace.bytes()));

  // Measured once per case (Google Benchmark calls this function several times per case).
  static std::map<std::tuple<Eigen::Index, Eigen::Index, bool, int>, double> shares;
  const auto key = std::make_tuple(num_kv_heads, n, causal, threads);
  auto share = shares.find(key);
  if (share == shares.end()) share = shares.emplace(key, attention_share(module, x, options)).first;
  state.counters["attn_share"] = share->second;
}

// ---------------------------------------------------------------------------------------
// Decode

/// A one-layer cache of the last (kind, length) asked for, holding `length` tokens of
/// random keys and values and room for one more. Filling up to 256 MiB takes a while, and
/// Google Benchmark calls a case's function several times; one cache at a time bounds the
/// memory.
/// The cache stores `Storage` (float, or 16 bits); one cache per storage type is held.
template <typename Storage>
attn::KVCache<Storage>& cache_for(const attn::MultiHeadAttentionf& module, Eigen::Index length) {
  static std::pair<Eigen::Index, Eigen::Index> held{-1, -1};
  static std::unique_ptr<attn::KVCache<Storage>> cache;
  if (held != std::make_pair(module.num_kv_heads(), length)) {
    cache.reset();  // free the previous one first
    cache = std::make_unique<attn::KVCache<Storage>>(module.make_cache<Storage>(1, length + 1));
    // Random keys and values appended a block of tokens at a time (no length × width
    // temporary); a key that a projection of real tokens would give is no faster or
    // slower to read.
    std::srand(777);
    for (Eigen::Index first = 0; first < length; first += 1024) {
      const Eigen::Index count = std::min<Eigen::Index>(1024, length - first);
      cache->append(0, Matrix::Random(count, cache->key_width()), Matrix::Random(count, cache->value_width()));
    }
    held = std::make_pair(module.num_kv_heads(), length);
  }
  cache->truncate(length);
  return *cache;
}

/// Bytes of the four projection weights and biases: a decode step reads each once.
double weight_bytes(const attn::MultiHeadAttentionf& module) {
  const auto size = [](const auto& tensor) { return static_cast<double>(tensor.size()); };
  return sizeof(float) * (size(module.query_weight()) + size(module.key_weight()) + size(module.value_weight()) +
                          size(module.output_weight()) + size(module.query_bias()) + size(module.key_bias()) +
                          size(module.value_bias()) + size(module.output_bias()));
}

template <typename Storage>
void BM_decode(benchmark::State& state, Eigen::Index num_kv_heads) {
  const Eigen::Index length = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const attn::MultiHeadAttentionf& module = module_for(num_kv_heads);
  attn::KVCache<Storage>& cache = cache_for<Storage>(module, length);
  const EigenThreads eigen_threads(threads);
  attn::AttentionOptionsf options;
  options.num_threads = threads;
  std::srand(4242);
  // x: (1 × E), the new token; out: (1 × E)
  const Eigen::RowVectorXf x = Eigen::RowVectorXf::Random(embed_dim);
  Eigen::RowVectorXf out = Eigen::RowVectorXf::Zero(embed_dim);
  attn::MultiHeadWorkspacef workspace;
  module.decode_into(x, cache, 0, options, out, workspace);  // sizes the workspace
  cache.truncate(length);
  const LoadProbe probe;
  for (auto _ : state) {
    module.decode_into(x, cache, 0, options, out, workspace);
    cache.truncate(length);  // O(1): the next step sees the same cache
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  // K and V of every token the step attends (the cache and the new token), read once: the
  // cache's bytes per token (a q8_0 cache's include its scales).
  const double kv_bytes = static_cast<double>(length + 1) * static_cast<double>(cache.bytes()) /
                          static_cast<double>(cache.capacity());
  const double weights = weight_bytes(module);
  set_rate(state, "tokens/s", 1.0);
  set_rate(state, "kv_GB/s", kv_bytes * 1e-9);
  set_rate(state, "total_GB/s", (kv_bytes + weights) * 1e-9);
  set_bytes(state, "kv_bytes", kv_bytes);
  set_bytes(state, "weight_bytes", weights);
  set_bytes(state, "scratch_bytes", static_cast<double>(workspace.bytes()));
}

// ---------------------------------------------------------------------------------------
// Memory bandwidth

/// Calls body(part, begin, end) on `threads` contiguous parts of [0, size), one per thread.
template <typename Body>
void split_over_threads(std::size_t size, int threads, const Body& body) {
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const auto parts = static_cast<std::size_t>(omp_get_num_threads());
      const auto part = static_cast<std::size_t>(omp_get_thread_num());
      body(part, size * part / parts, size * (part + 1) / parts);
    }
    return;
  }
#else
  (void)threads;
#endif
  body(std::size_t{0}, std::size_t{0}, size);
}

/// Buffers of 4-byte floats, allocated and touched outside the timed loop.
struct Buffers {
  explicit Buffers(std::size_t bytes) : source(bytes / sizeof(float), 1.0f), target(bytes / sizeof(float), 0.0f) {}
  std::vector<float> source;
  std::vector<float> target;
};

void BM_copy(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  Buffers buffers(bytes);
  const float* source = buffers.source.data();
  float* target = buffers.target.data();
  const std::size_t floats = buffers.source.size();
  const LoadProbe probe;
  for (auto _ : state) {
    split_over_threads(floats, threads, [&](std::size_t /*part*/, std::size_t begin, std::size_t end) {
      std::memcpy(target + begin, source + begin, (end - begin) * sizeof(float));
    });
    benchmark::DoNotOptimize(target);
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "read_GB/s", static_cast<double>(bytes) * 1e-9);
  set_bytes(state, "bytes", static_cast<double>(bytes));
}

/// Reads only: the sum of the buffer, vectorised by Eigen, one partial sum per thread.
void BM_read(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  const std::vector<float> source(bytes / sizeof(float), 1.0f);
  std::vector<float> sums(static_cast<std::size_t>(threads) * 16, 0.0f);  // a cache line per thread
  const LoadProbe probe;
  for (auto _ : state) {
    split_over_threads(source.size(), threads, [&](std::size_t part, std::size_t begin, std::size_t end) {
      sums[part * 16] =
          Eigen::Map<const Eigen::VectorXf>(source.data() + begin, static_cast<Eigen::Index>(end - begin)).sum();
    });
    benchmark::DoNotOptimize(sums.data());
    benchmark::ClobberMemory();
  }
  probe.report(state);
  set_rate(state, "read_GB/s", static_cast<double>(bytes) * 1e-9);
  set_bytes(state, "bytes", static_cast<double>(bytes));
}

// ---------------------------------------------------------------------------------------
// Registration

/// Every case runs three times and reports the median (with mean, stddev and cv): on a
/// shared host one run can be disturbed by another tenant of the L3 or the memory bus. The
/// JSON keeps each repetition and the aggregates; the console shows the aggregates. Set
/// here rather than by `--benchmark_repetitions`, so that rerun_contaminated.py, which
/// re-runs cases by name, repeats them the same way.
constexpr int repetitions = 3;

benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* benchmark,
                                          benchmark::TimeUnit unit = benchmark::kMillisecond) {
  return benchmark->Unit(unit)->UseRealTime()->Repetitions(repetitions)->DisplayAggregatesOnly(true);
}

/// Decode cases' name prefixes and cache storage.
const std::pair<std::string, void (*)(benchmark::State&, Eigen::Index)> decode_storages[] = {
    {"decode/", BM_decode<float>},
    {"decode_bf16/", BM_decode<attn::bfloat16>},
    {"decode_half/", BM_decode<attn::half>},
    {"decode_q8/", BM_decode<attn::q8_0>},
};

void register_all(std::int64_t max_n) {
  for (const std::int64_t n : {128, 256, 512, 1024, 2048, 4096}) {
    if (n > max_n) continue;
    for (const int causal : {0, 1}) {
      for (const int threads : thread_counts()) {
        for (const Kind& kind : kinds) {
          const Eigen::Index num_kv_heads = kind.num_kv_heads;
          configure(benchmark::RegisterBenchmark((std::string("mha_forward/") + kind.name).c_str(),
                                                 [num_kv_heads](benchmark::State& state) {
                                                   BM_forward(state, num_kv_heads);
                                                 })
                        ->ArgNames({"N", "causal", "threads"})
                        ->Args({n, causal, threads}));
        }
      }
    }
  }
  // The bandwidth the decode steps are compared with, measured just before them.
  for (const std::int64_t mib : {1, 4, 8, 16, 64, 256}) {
    for (const int threads : thread_counts()) {
      const std::vector<std::int64_t> args{mib << 20, threads};
      configure(benchmark::RegisterBenchmark("copy", BM_copy)->ArgNames({"bytes", "threads"})->Args(args));
      configure(benchmark::RegisterBenchmark("read", BM_read)->ArgNames({"bytes", "threads"})->Args(args));
    }
  }
  for (const std::int64_t length : {256, 1024, 4096, 16384, 65536}) {
    if (length > max_n) continue;
    for (const int threads : thread_counts()) {
      for (const Kind& kind : kinds) {
        const Eigen::Index num_kv_heads = kind.num_kv_heads;
        // The float cache, then the same step over caches stored in 16 bits: half the
        // bytes to read.
        for (const auto& [prefix, decode] : decode_storages) {
          configure(benchmark::RegisterBenchmark((prefix + kind.name).c_str(),
                                                 [num_kv_heads, decode = decode](benchmark::State& state) {
                                                   decode(state, num_kv_heads);
                                                 })
                        ->ArgNames({"cache", "threads"})
                        ->Args({length, threads}),
                    benchmark::kMicrosecond);
        }
      }
    }
  }
}

void add_context() {
  attn_bench::add_common_context();

  benchmark::AddCustomContext("embed_dim", std::to_string(embed_dim));
  benchmark::AddCustomContext("num_heads", std::to_string(num_heads));
  benchmark::AddCustomContext("kinds", "mha: num_kv_heads = 8, gqa: num_kv_heads = 2");
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t max_n = take_max_n(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_context();
  register_all(max_n);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
