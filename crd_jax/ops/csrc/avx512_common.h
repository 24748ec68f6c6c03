// Helpers of the AVX-512 and AMX files (anonymous namespace: each file compiles its own copy with its flags).
#pragma once

#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "include avx512_common.h only from files compiled with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <cstdint>

namespace crd {
namespace {

inline __mmask16 LaneMask(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF) : valid <= 0 ? 0 : static_cast<__mmask16>((1u << valid) - 1);
}

// acc += x * w, lane by lane. kBf16: x and w each hold 16 pairs of bfloat16 values (a pair of input channels;
// the same pair broadcast in x), and each lane adds the pair's dot product (VDPBF16PS, float32 sums).
template <bool kBf16>
inline __m512 MulAdd(__m512 x, __m512 w, __m512 acc) {
  if constexpr (kBf16) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(x), reinterpret_cast<__m512bh&>(w));
  } else {
    return _mm512_fmadd_ps(x, w, acc);
  }
}


}  // namespace
}  // namespace crd
