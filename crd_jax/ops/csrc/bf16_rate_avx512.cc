// The bfloat16 rate probe the runtime uses: multiply-adds per second of VDPBF16PS over float32 FMAs on this CPU
// (crd_bf16_speedup, control_api.cc). Not a benchmark: `crd-jax register --bf16` reads it (~20 ms, once per
// process) to say in its log whether bfloat16 is likely to be faster here, and results files record it. The
// AMX twin is in conv_amx.cc (it needs the tile configuration); the FMA peak benchmark is benchmarks/csrc/.
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "avx512_common.h"
#include "conv_common.h"

namespace crd::avx512 {
namespace {

// Seconds for `iters` rounds of 24 independent multiply-add chains (as many as a kernel tile) on 16 lanes:
// VFMADD (one float32 multiply-add per lane) or, with kBf16, VDPBF16PS (two bfloat16 multiply-adds per lane).
template <bool kBf16>
double TimedMulAddChains(int64_t iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1.0f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = MulAdd<kBf16>(a, b, acc[i]);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0.0f;
  for (int i = 0; i < 24; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  static volatile float sink;
  sink = sum;
  return seconds;
}

}  // namespace

double Bf16MulAddSpeedup() {
  constexpr int64_t kIters = 1 << 19;
  double fp32 = 1e30, bf16 = 1e30;
  for (int round = 0; round < 3; ++round) {  // the fastest of three: the machine's rate, not its noise
    fp32 = std::min(fp32, TimedMulAddChains<false>(kIters));
    bf16 = std::min(bf16, TimedMulAddChains<true>(kIters));
  }
  return 2.0 * fp32 / bf16;
}

// Seconds for `iters` rounds of 24 independent FMA chains on 16 lanes (the float32 side of the AMX probe).
double TimedFmaChains(int64_t iters) { return TimedMulAddChains<false>(iters); }

}  // namespace crd::avx512
