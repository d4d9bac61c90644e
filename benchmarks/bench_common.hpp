#pragma once
/// @file
/// What the attn benchmarks share: `LoadProbe` (how much of the machine a case had),
/// counters, thread counts, the `--attn_max_n` flag and the JSON context.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <benchmark/benchmark.h>

#include <attn/version.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__linux__)
#include <unistd.h>
#endif

namespace attn_bench {

/// Measures how much of the machine the case had: on a shared machine another process
/// taking a core halves a 2-thread run (and worse: Eigen's GEMM threads spin at their
/// barriers while one of them is descheduled). Reports `other_cpus`, the CPUs other
/// processes kept busy on average during the timed loop (from /proc/stat, Linux only),
/// so that ratios.py can flag a comparison made under interference.
class LoadProbe {
 public:
  LoadProbe() : busy_(busy_seconds()), own_(own_seconds()), start_(std::chrono::steady_clock::now()) {}

  void report(benchmark::State& state) const {
    const double busy = busy_seconds();
    if (busy < 0.0 || busy_ < 0.0) return;
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double other = (busy - busy_) - (own_seconds() - own_);
    if (wall > 0.0) state.counters["other_cpus"] = std::max(0.0, other / wall);
  }

 private:
  /// CPU-seconds all processes have spent busy since boot, or −1 without /proc/stat.
  /// Steal time (the hypervisor running someone else) counts as busy: it is lost too.
  static double busy_seconds() {
#if defined(__linux__)
    std::ifstream stat("/proc/stat");
    std::string cpu;
    long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
    if (!(stat >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal) || cpu != "cpu") {
      return -1.0;
    }
    return static_cast<double>(user + nice + system + irq + softirq + steal) / static_cast<double>(sysconf(_SC_CLK_TCK));
#else
    return -1.0;
#endif
  }

  static double own_seconds() {
    timespec now{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
  }

  double busy_;
  double own_;
  std::chrono::steady_clock::time_point start_;
};

/// Counter `name` = `per_iteration` per second of the run.
inline void set_rate(benchmark::State& state, const char* name, double per_iteration) {
  // kIsRate divides by the run's (real) time, so the counter holds the total of all iterations.
  state.counters[name] =
      benchmark::Counter(per_iteration * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

/// Counter `name` = a byte count, printed in KiB, MiB, ….
inline void set_bytes(benchmark::State& state, const char* name, double bytes) {
  state.counters[name] = benchmark::Counter(bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

/// 1 and every thread OpenMP offers (2 on the reference machine); just 1 without OpenMP.
inline std::vector<int> thread_counts() {
  std::vector<int> counts{1};
#if defined(_OPENMP)
  if (omp_get_max_threads() > 1) counts.push_back(omp_get_max_threads());
#endif
  return counts;
}

/// Removes `--attn_max_n=N` from argv (Google Benchmark rejects flags it does not know).
inline std::int64_t take_max_n(int& argc, char** argv) {
  std::int64_t max_n = INT64_MAX;
  const char* flag = "--attn_max_n=";
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], flag, std::strlen(flag)) == 0) {
      max_n = std::strtoll(argv[i] + std::strlen(flag), nullptr, 10);
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  return max_n;
}

/// The JSON context every attn benchmark records: versions, SIMD, -march=native, OpenMP.
inline void add_common_context() {
  benchmark::AddCustomContext("attn_version", std::to_string(attn::version_major) + "." +
                                                  std::to_string(attn::version_minor) + "." +
                                                  std::to_string(attn::version_patch));
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#if defined(ATTN_BENCHMARK_NATIVE)
  benchmark::AddCustomContext("march_native", "1");
#else
  benchmark::AddCustomContext("march_native", "0");
#endif
#if defined(_OPENMP)
  benchmark::AddCustomContext("openmp_max_threads", std::to_string(omp_get_max_threads()));
#else
  benchmark::AddCustomContext("openmp_max_threads", "0 (built without OpenMP)");
#endif
}

}  // namespace attn_bench
