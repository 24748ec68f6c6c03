// The forward tiles for AVX-512 (16 lanes): the AVX2 file's loop nest with 16 output channels per vector and 32
// registers for partial sums, the activation applied in registers; their bfloat16 twins (VDPBF16PS); the
// few-output-channel kernel for C_in in multiples of 16; and the bfloat16 packing of the fused decoder step.
//
// Compiled with the AVX-512 flags (CMakeLists.txt); only called when the CPU has AVX-512 (dispatch.cc).
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512_common.h"
#include "conv_common.h"
#include "parallel.h"

namespace crd::avx512 {

constexpr int kTile512K3 = 24;   // AVX-512 columns per tile: 16 output channels, stride 1, 3 taps
constexpr int kTile512Cb1 = 24;  // 16 output channels, other strides
constexpr int kTile512Cb2 = 12;  // 32 output channels

// every "float" of x and w is a pair of bfloat16 input channels (Ci counts pairs).
template <int CB, int TW, bool kBf16 = false>
inline void Fwd512Tile(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t ow0,
                       int64_t co0, float slope, bool act, float* yrow) {
  __m512 acc[TW][CB];
  __mmask16 mask[CB];
#pragma GCC unroll 16
  for (int c = 0; c < CB; ++c) {
    mask[c] = LaneMask(g.Co - co0 - 16 * c);
    const __m512 bv = _mm512_maskz_loadu_ps(mask[c], bias + co0 + 16 * c);
#pragma GCC unroll 32
    for (int t = 0; t < TW; ++t) acc[t][c] = bv;
  }
  // Weights are padded to CoP (a multiple of 8): the last vector of a block may read past it, so it is masked.
  __mmask16 wmask[CB];
#pragma GCC unroll 16
  for (int c = 0; c < CB; ++c) wmask[c] = LaneMask(g.CoP - co0 - 16 * c);
  const int64_t Ci = g.Ci, CoP = g.CoP;
  const int64_t xstep = g.sw * Ci;
  for (int r = 0; r < rs.n; ++r) {
    const float* xrow = rs.rows[r] + ow0 * xstep;
    const float* wtap = w + rs.taps[r] * g.KW * Ci * CoP + co0;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const float* wp = wtap + kw * Ci * CoP;
      const float* xp = xrow + kw * Ci;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        __m512 wv[CB];
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) wv[c] = _mm512_maskz_loadu_ps(wmask[c], wp + ci * CoP + 16 * c);
#pragma GCC unroll 32
        for (int t = 0; t < TW; ++t) {
          const __m512 xv = _mm512_set1_ps(xp[t * xstep + ci]);
#pragma GCC unroll 16
          for (int c = 0; c < CB; ++c) acc[t][c] = MulAdd<kBf16>(xv, wv[c], acc[t][c]);
        }
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps(), sl = _mm512_set1_ps(slope);
#pragma GCC unroll 32
  for (int t = 0; t < TW; ++t) {
    float* yp = yrow + (ow0 + t) * g.Co + co0;
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) {
      __m512 v = acc[t][c];
      if (act) v = _mm512_fmadd_ps(sl, _mm512_min_ps(v, zero), _mm512_max_ps(v, zero));  // as LeakyRow
      _mm512_mask_storeu_ps(yp + 16 * c, mask[c], v);
    }
  }
}

// Stride 1, KW = 3, 16 output channels: each broadcast input value feeds the three output columns it is a tap
// of (one FMA per kw), so a tile of TW columns needs TW + 2 broadcasts for 3 TW FMAs instead of 3 TW.
template <int TW, bool kBf16 = false>
inline void Fwd512TileK3(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t ow0,
                         int64_t co0, float slope, bool act, float* yrow) {
  __m512 acc[TW];
  const __mmask16 mask = LaneMask(g.Co - co0), wmask = LaneMask(g.CoP - co0);
  const __m512 bv = _mm512_maskz_loadu_ps(mask, bias + co0);
#pragma GCC unroll 32
  for (int t = 0; t < TW; ++t) acc[t] = bv;
  const int64_t Ci = g.Ci, CoP = g.CoP;
  for (int r = 0; r < rs.n; ++r) {
    const float* xp = rs.rows[r] + ow0 * Ci;
    const float* wp = w + rs.taps[r] * 3 * Ci * CoP + co0;
    for (int64_t ci = 0; ci < Ci; ++ci) {
      const __m512 w0 = _mm512_maskz_loadu_ps(wmask, wp + ci * CoP);
      const __m512 w1 = _mm512_maskz_loadu_ps(wmask, wp + (Ci + ci) * CoP);
      const __m512 w2 = _mm512_maskz_loadu_ps(wmask, wp + (2 * Ci + ci) * CoP);
#pragma GCC unroll 40
      for (int j = 0; j < TW + 2; ++j) {  // input column ow0 + j - 1 + ... : tap kw of output column j - kw
        const __m512 xv = _mm512_set1_ps(xp[j * Ci + ci]);
        if (j < TW) acc[j] = MulAdd<kBf16>(xv, w0, acc[j]);
        if (j >= 1 && j - 1 < TW) acc[j - 1] = MulAdd<kBf16>(xv, w1, acc[j - 1]);
        if (j >= 2) acc[j - 2] = MulAdd<kBf16>(xv, w2, acc[j - 2]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps(), sl = _mm512_set1_ps(slope);
#pragma GCC unroll 32
  for (int t = 0; t < TW; ++t) {
    __m512 v = acc[t];
    if (act) v = _mm512_fmadd_ps(sl, _mm512_min_ps(v, zero), _mm512_max_ps(v, zero));
    _mm512_mask_storeu_ps(yrow + (ow0 + t) * g.Co + co0, mask, v);
  }
}

template <int CB, bool kBf16>
struct Avx512Tile {
  const Geometry& g;
  const RowSet& rs;
  const float *w, *bias;
  int64_t co0;
  float slope;
  bool act;
  float* yrow;
  template <int TW>
  void run(int64_t ow) const { Fwd512Tile<CB, TW, kBf16>(g, rs, w, bias, ow, co0, slope, act, yrow); }
};

template <bool kBf16>
struct Avx512TileK3 {
  const Geometry& g;
  const RowSet& rs;
  const float *w, *bias;
  int64_t co0;
  float slope;
  bool act;
  float* yrow;
  template <int TW>
  void run(int64_t ow) const { Fwd512TileK3<TW, kBf16>(g, rs, w, bias, ow, co0, slope, act, yrow); }
};

template <bool kBf16>
void Avx512ColumnsT(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                    int64_t end, float slope, bool act, float* yrow) {
  if (begin >= end) return;
  int64_t co0 = 0;
  for (; co0 + 16 < g.Co; co0 += 32) {
    TileColumns<kTile512Cb2, kTile512Cb2 / 4>(begin, begin, end,
                                             Avx512Tile<2, kBf16>{g, rs, w, bias, co0, slope, act, yrow});
  }
  const bool k3 = g.sw == 1 && g.KW == 3;
  for (; co0 < g.Co; co0 += 16) {
    if (k3) {
      TileColumns<kTile512K3, kTile512K3 / 4>(begin, begin, end,
                                             Avx512TileK3<kBf16>{g, rs, w, bias, co0, slope, act, yrow});
    } else {
      TileColumns<kTile512Cb1, kTile512Cb1 / 4>(begin, begin, end,
                                               Avx512Tile<1, kBf16>{g, rs, w, bias, co0, slope, act, yrow});
    }
  }
}

void Avx512Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                   int64_t end, float slope, bool act, float* yrow) {
  Avx512ColumnsT<false>(g, rs, w, bias, begin, end, slope, act, yrow);
}

void Avx512Bf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                       int64_t end, float slope, bool act, float* yrow) {
  Avx512ColumnsT<true>(g, rs, w, bias, begin, end, slope, act, yrow);
}

// r[i] = the sum of the 16 lanes of v[i]: pairs of vectors interleaved and added within 128-bit lanes (twice),
// then across lanes (twice), which leaves the sums in order.
inline __m512 LaneSums16(const __m512* v) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k)
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// Few output channels (the flow head) with C_in a multiple of 16, AVX-512: a vector holds 16 input channels of
// one voxel, read in place from the channels-last input (no transposition); J voxels x CO channels of
// partial sums stay in registers over every tap and are summed across lanes once at the end (CO * J
// horizontal sums per 27 * CO * J FMAs for a 3x3x3 kernel and 16 channels).
template <int CO, int J, bool kEdge>
inline void SmallCoCi16Tile(const Geometry& g, const RowSet& rs, const float* wt, const float* bias, int64_t ow0,
                            int64_t nvalid, float slope, bool act, float* yrow) {
  __m512 acc[CO][J];
#pragma GCC unroll 16
  for (int c = 0; c < CO; ++c)
#pragma GCC unroll 32
    for (int j = 0; j < J; ++j) acc[c][j] = _mm512_setzero_ps();
  const int64_t Ci = g.Ci;
  for (int r = 0; r < rs.n; ++r) {
    const float* xrow = rs.rows[r];
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const float* wk = wt + (rs.taps[r] * g.KW + kw) * CO * Ci;
      const int64_t iw0 = ow0 * g.sw + kw - g.pw;
      for (int64_t ci = 0; ci < Ci; ci += 16) {
        __m512 wv[CO];
#pragma GCC unroll 16
        for (int c = 0; c < CO; ++c) wv[c] = _mm512_loadu_ps(wk + c * Ci + ci);
#pragma GCC unroll 32
        for (int j = 0; j < J; ++j) {
          const int64_t iw = iw0 + j * g.sw;
          __m512 xv;
          if constexpr (kEdge) {  // columns in the zero padding: a masked-off load reads nothing
            xv = _mm512_maskz_loadu_ps(iw >= 0 && iw < g.W ? 0xFFFF : 0, xrow + iw * Ci + ci);
          } else {
            xv = _mm512_loadu_ps(xrow + iw * Ci + ci);
          }
          // One load per input vector: left alone, the compiler folds it into each of the CO FMAs, and the
          // repeated 512-bit loads then compete with the FMAs for issue slots.
          asm("" : "+v"(xv));
#pragma GCC unroll 16
          for (int c = 0; c < CO; ++c) acc[c][j] = _mm512_fmadd_ps(xv, wv[c], acc[c][j]);
        }
      }
    }
  }
  // Output k = j * CO + c of the tile is the lane sum of acc[c][j]: 16 of them at a time, transposed and added
  // into one vector in output order (45 shuffles and adds instead of 16 horizontal sums of ~9 each).
  constexpr int kOut = CO * J, kGroups = (kOut + 15) / 16;
  const int64_t n = (kEdge ? nvalid : J) * CO;
  const __m512 zero = _mm512_setzero_ps(), sl = _mm512_set1_ps(slope);
#pragma GCC unroll 2
  for (int grp = 0; grp < kGroups; ++grp) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      const int k = 16 * grp + i;
      v[i] = k < kOut ? acc[k % CO][k / CO] : zero;
    }
    __m512 sum = LaneSums16(v);
    alignas(64) float b[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) b[i] = bias[(16 * grp + i) % CO];
    sum = _mm512_add_ps(sum, _mm512_load_ps(b));
    if (act) sum = _mm512_fmadd_ps(sl, _mm512_min_ps(sum, zero), _mm512_max_ps(sum, zero));  // as LeakyRow
    _mm512_mask_storeu_ps(yrow + ow0 * g.Co + 16 * grp, LaneMask(n - 16 * grp), sum);
  }
}

template <int CO>
void SmallCoCi16Forward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                        float* y) {
  constexpr int J = CO == 1 ? 16 : 24 / CO;  // CO * J accumulators + CO weights + 1 input of 32 registers
  const int64_t Ci = g.Ci, taps = g.KD * g.KH * g.KW;
  // Weights [tap][kw][ci][co (padded to CoP)] -> [tap][kw][co][ci]: one vector per (tap, output channel).
  std::vector<float> wt(taps * CO * Ci);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int c = 0; c < CO; ++c) wt[(t * CO + c) * Ci + ci] = w[(t * Ci + ci) * g.CoP + c];
  const int64_t band = BandRows(g);
  ParallelFor(g.B * g.Do, NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t oh0 = 0; oh0 < g.Ho; oh0 += band)
      for (int64_t p = begin; p < end; ++p)
        for (int64_t oh = oh0; oh < std::min(g.Ho, oh0 + band); ++oh) {
          const RowSet rs = InputRows(g, x, p / g.Do, p % g.Do, oh);
          float* yrow = y + (p * g.Ho + oh) * g.Wo * g.Co;
          for (int64_t ow0 = 0; ow0 < g.Wo; ow0 += J) {
            const int64_t nvalid = std::min<int64_t>(J, g.Wo - ow0);
            const bool inside = nvalid == J && ow0 * g.sw - g.pw >= 0 && (ow0 + J - 1) * g.sw + g.KW - 1 - g.pw < g.W;
            if (inside) {
              SmallCoCi16Tile<CO, J, false>(g, rs, wt.data(), bias, ow0, nvalid, slope, act, yrow);
            } else {
              SmallCoCi16Tile<CO, J, true>(g, rs, wt.data(), bias, ow0, nvalid, slope, act, yrow);
            }
          }
        }
  });
}

// n floats (n even) -> n / 2 words, each a pair of bfloat16 (rounded to nearest even, element 2k in the low
// half): the layout ``_pairs_as_float32`` gives JAX arrays for the bf16 tiles.
void PackBf16Pairs(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_ps(dst + i / 2, reinterpret_cast<__m512&>(v));
  }
  if (i < n) {
    const int64_t r = n - i;
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(LaneMask(r - 16), src + i + 16),
                                     _mm512_maskz_loadu_ps(LaneMask(r), src + i));
    _mm512_mask_storeu_ps(dst + i / 2, LaneMask(r / 2), reinterpret_cast<__m512&>(v));
  }
}

// C_out <= 4 on the AVX-512 path; false where the few-channel AVX2 kernel must run instead.
bool SmallCoAvx512(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                   float* y) {
  if (g.Ci % 16 != 0) return false;
  switch (g.Co) {
    case 1: SmallCoCi16Forward<1>(g, x, w, bias, slope, act, y); return true;
    case 2: SmallCoCi16Forward<2>(g, x, w, bias, slope, act, y); return true;
    case 3: SmallCoCi16Forward<3>(g, x, w, bias, slope, act, y); return true;
    case 4: SmallCoCi16Forward<4>(g, x, w, bias, slope, act, y); return true;
  }
  return false;
}

}  // namespace crd::avx512
