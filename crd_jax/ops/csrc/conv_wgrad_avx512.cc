// The blocked weight gradient (wgrad_blocked.h) with 16-lane AVX-512 registers: 32 registers hold up to ~28
// accumulators, and masked loads end a vector block at KW * Ci or C_out without a scalar tail.
//
// Compiled with the AVX-512 flags (CMakeLists.txt); only called when the CPU has AVX-512 (dispatch.cc).
#if !defined(__AVX512F__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <cstdint>

#include "avx512_common.h"
#include "conv_common.h"
#include "wgrad_blocked.h"

namespace crd::avx512 {
namespace {

struct Vec512 {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;
  static constexpr double kFmaPerCycle = 1.0;  // Zen 4 issues a 512-bit FMA on both 256-bit pipes
  static constexpr double kBroadcastFma = 0.5;  // see WgradTileCycles
  static Reg Zero() { return _mm512_setzero_ps(); }
  static Mask MaskOf(int64_t valid) { return LaneMask(valid); }
  static Reg Load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg LoadMasked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static Reg Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg MulAdd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static void AddTo(float* p, Reg v) { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v)); }
};

}  // namespace

void WeightGradAvx512(const Geometry& g, const float* x, const float* dy, float* dw_out) {
  WeightGradBlocked<Vec512>(g, x, dy, dw_out);
}

}  // namespace crd::avx512
