#pragma once
/// @file
/// The one place attn touches OpenMP: a parallel loop over independent work items that
/// runs sequentially when OpenMP is off (no `-fopenmp`, or `attn::attn` rather than
/// `attn::attn_openmp`), so no header needs a pragma of its own.

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attn::detail {

/// How many threads a call may use: `requested` (0 = all OpenMP offers), 1 without OpenMP.
inline int resolve_thread_count(int requested) noexcept {
#if defined(_OPENMP)
  return requested == 0 ? omp_get_max_threads() : requested;
#else
  (void)requested;
  return 1;
#endif
}

/// Calls body(item, thread) for item in [0, count), thread in [0, threads). Which thread
/// runs which item varies; callers make every item's result independent of that.
/// `body` must not throw: an exception cannot leave an OpenMP region.
template <typename Body>
void parallel_for(Eigen::Index count, int threads, const Body& body) {
#if defined(_OPENMP)
  if (threads > 1 && count > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (Eigen::Index item = 0; item < count; ++item) body(item, omp_get_thread_num());
    return;
  }
#else
  (void)threads;
#endif
  for (Eigen::Index item = 0; item < count; ++item) body(item, 0);
}

}  // namespace attn::detail
