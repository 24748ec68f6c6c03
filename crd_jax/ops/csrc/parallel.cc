// The process's thread pool (parallel.h), compiled with the baseline flags only.
#include "parallel.h"

#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace crd {
namespace {

// CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers), so that
// the kernel does not oversubscribe a machine that hardware_concurrency() describes but does not grant.
int AllowedCpus() {
  int n = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r")) {
    char quota[32] = {0};
    long long period = 0;
    if (std::fscanf(f, "%31s %lld", quota, &period) == 2 && std::strcmp(quota, "max") != 0 && period > 0) {
      long long q = std::atoll(quota);
      int cap = static_cast<int>((q + period - 1) / period);
      if (cap > 0) n = std::min(n, cap);
    }
    std::fclose(f);
  }
  return std::max(n, 1);
}

// One persistent pool for the process (threads are started once, not on every call). Run(k, fn) runs
// fn(0..k-1), fn(0) on the caller, and returns when all are done; one parallel region at a time.
class Pool {
 public:
  explicit Pool(int size) {
    for (int t = 1; t < size; ++t) std::thread([this, t] { Loop(t); }).detach();
  }

  void Run(int threads, const std::function<void(int)>& fn) {
    if (threads <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> region(region_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      active_ = threads;
      pending_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (t >= active_) continue;
        fn = fn_;
      }
      (*fn)(t);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex region_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

Pool& ThePool() {
  static Pool* pool = new Pool(NumThreads());  // never destroyed: its threads live as long as the process
  return *pool;
}

}  // namespace

int NumThreads() {
  static int n = [] {
    if (const char* env = std::getenv("CRD_JAX_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    return AllowedCpus();
  }();
  return n;
}

void RunOnPool(int threads, const std::function<void(int)>& fn) { ThePool().Run(threads, fn); }

}  // namespace crd
