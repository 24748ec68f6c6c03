// The native kernels' threads: one persistent pool per process, sized by the CPUs the process may use.
//
// Only declarations and the ParallelFor template live here; the pool itself is compiled once, in parallel.cc,
// with the baseline flags. (Inline functions in a header are compiled into every file that includes it, with
// that file's flags, and the linker keeps one copy: an AVX-512 file's copy of the pool could then run on a CPU
// without AVX-512. ParallelFor is instantiated per caller lambda, so each copy stays with its own file.)
#pragma once

#include <cstdint>
#include <functional>

namespace crd {

// Threads the kernels use: CRD_JAX_NUM_THREADS, else the CPUs of the process's affinity mask capped by a
// cgroup v2 CPU quota (containers).
int NumThreads();

// Runs fn(0..threads-1) on the process's pool, fn(0) on the caller, and returns when all are done; one parallel
// region at a time.
void RunOnPool(int threads, const std::function<void(int)>& fn);

// Runs fn(begin, end, thread_index) over [0, n) split into contiguous chunks, one per thread.
template <typename Fn>
inline void ParallelFor(int64_t n, int max_threads, Fn fn) {
  const int most = max_threads < NumThreads() ? max_threads : NumThreads();
  const int threads = static_cast<int>(n < most ? n : most);
  if (threads <= 1) {
    fn(0, n, 0);
    return;
  }
  RunOnPool(threads, [&](int t) {
    int64_t begin = n * t / threads, end = n * (t + 1) / threads;
    fn(begin, end, t);
  });
}

}  // namespace crd
