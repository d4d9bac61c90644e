#pragma once
/// @file
/// The one place attn touches OpenMP: a parallel loop over independent work items that
/// runs sequentially when OpenMP is off (no `-fopenmp`, or `attn::attn` rather than
/// `attn::attn_openmp`), so no header needs a pragma of its own.

#include <algorithm>
#include <exception>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attn::detail {

/// How many threads a call may use: `requested`, at most what OpenMP offers
/// (`omp_get_max_threads()`: OMP_NUM_THREADS, `omp_set_num_threads`, else one per core),
/// 0 for all of that; 1 without OpenMP. Capped because every thread gets a workspace slot:
/// a million asked for would be a million slots and as many threads asked of OpenMP.
inline int resolve_thread_count(int requested) noexcept {
#if defined(_OPENMP)
  const int offered = omp_get_max_threads();
  return requested == 0 ? offered : std::min(requested, offered);
#else
  (void)requested;
  return 1;
#endif
}

/// Calls body(item, thread) for item in [0, count), thread in [0, threads). Which thread
/// runs which item varies; callers make every item's result independent of that. If a body
/// throws, the first exception caught is rethrown once every thread has stopped: an
/// exception may not leave an OpenMP region.
template <typename Body>
void parallel_for(Eigen::Index count, int threads, const Body& body) {
#if defined(_OPENMP)
  std::exception_ptr failure;
  // A region even for one thread: inside it, this task's thread count is set to 1, so
  // Eigen (which parallelises its own products when built with OpenMP) keeps each tile
  // product on the thread that runs it, sequential and allocation-free. The setting ends
  // with the region; the caller's is untouched.
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
    for (Eigen::Index item = 0; item < count; ++item) {
      try {
        body(item, omp_get_thread_num());
      } catch (...) {
#pragma omp critical(attn_parallel_for_failure)
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
#else
  (void)threads;
  for (Eigen::Index item = 0; item < count; ++item) body(item, 0);
#endif
}

}  // namespace attn::detail
