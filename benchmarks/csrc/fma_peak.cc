// The FMA peak of one core: independent chains of fused multiply-adds, enough of them to cover the FMA
// latency on every port, for a fixed time. Returns GFLOP/s (2 flops per lane per FMA) of the calling thread.
#include <immintrin.h>

#include <chrono>

namespace {

constexpr int kChains = 12;  // >= latency (4-5 cycles) x ports (2): no chain waits on itself

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((target("avx2,fma"))) double Avx2(double seconds) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(1.0f + 1e-3f * i);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  long long iterations = 0;
  const double start = Seconds();
  double now = start;
  while (now - start < seconds) {
    for (int r = 0; r < 4096; ++r) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);  // unrolled: acc stays in registers
    }
    iterations += 4096;
    now = Seconds();
  }
  __m256 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm256_add_ps(sum, acc[i]);
  volatile float sink = _mm256_cvtss_f32(sum);
  (void)sink;
  return iterations * kChains * 8.0 * 2.0 / (now - start) / 1e9;
}

__attribute__((target("avx512f"))) double Avx512(double seconds) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + 1e-3f * i);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  long long iterations = 0;
  const double start = Seconds();
  double now = start;
  while (now - start < seconds) {
    for (int r = 0; r < 4096; ++r) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    }
    iterations += 4096;
    now = Seconds();
  }
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return iterations * kChains * 16.0 * 2.0 / (now - start) / 1e9;
}

}  // namespace

extern "C" int has_avx512() { return __builtin_cpu_supports("avx512f"); }
extern "C" int has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
extern "C" double fma_gflops(int width, double seconds) { return width == 512 ? Avx512(seconds) : Avx2(seconds); }
