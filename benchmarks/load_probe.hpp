#pragma once
/// @file
/// `LoadProbe`, shared by the attn benchmarks: how much of the machine a case had.

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <string>

#include <benchmark/benchmark.h>

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

}  // namespace attn_bench
