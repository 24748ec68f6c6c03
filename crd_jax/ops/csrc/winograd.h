// Winograd F(2x2x2, 3x3x3) for stride-1, 3^3, padding-1 convolutions, AVX-512 float32 (Lavin & Gray 2016).
//
// Why: the direct kernel runs at 65-85% of the FMA peak, which bounds it at ~1.3x what PyTorch/oneDNN reaches on
// the same CPU. Winograd computes each 2x2x2 block of outputs from a 4x4x4 block of inputs with 64 products
// per (input, output) channel pair instead of 8 x 27 = 216: 3.4x fewer multiply-adds, paid for with additions
// (the transforms) that are cheap next to them when both channel counts are >= 16.
//
// One dimension, F(2, 3): for inputs d0..d3 and taps g0..g2 (cross-correlation, as every CNN convolution)
//   y0 = d0 g0 + d1 g1 + d2 g2,  y1 = d1 g0 + d2 g1 + d3 g2
// is  y = A^T [(G g) * (B^T d)]  with
//   B^T d = (d0 - d2, d1 + d2, d2 - d1, d1 - d3),  G g = (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2),
//   A^T m = (m0 + m1 + m2, m1 - m2 - m3).
// In 3-D each transform is applied along the three axes in turn, and the 64 products of a block become 64
// independent matrix products over channels: M[p][tile][co] = sum_ci U[p][tile][ci] V[p][ci][co].
//
// This file holds the transforms and the work of one row of tiles; the caller (conv_winograd_avx512.cc) provides the input
// rows (zero-padded: virtual column c is input column c - 1) and the output rows.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace crd::winograd {

constexpr int64_t kChunk = 24;  // tiles transformed and multiplied together (U and M stay in the L2 cache)
constexpr int64_t kMaxChannels = 128;  // input channels of the Winograd path (U's tile stride is a template)
// The 64 slices of U, M and V lie this many floats further apart than their size: at a power-of-two distance
// (16 tiles x 16 channels x 4 bytes = 1 KB) the 64 lines a tile writes fell into 4 of the L1 cache's 64 sets.
constexpr int64_t kSkew = 16;

inline int64_t WeightStride(int64_t ci, int64_t co) { return ci * co + kSkew; }

// V[p][ci][co], p = (a * 4 + b) * 4 + c: G g G^T along the three axes of w[kd][kh][kw][ci][co] (co padded to cop);
// slice p starts at p * WeightStride(ci, co).
inline std::vector<float> TransformWeights(const float* w, int64_t ci, int64_t co, int64_t cop) {
  std::vector<float> v(64 * WeightStride(ci, co));
  auto g4 = [](const float* g3, int64_t stride, float* out) {  // out[0..3] = G (g3[0], g3[s], g3[2s])
    const float g0 = g3[0], g1 = g3[stride], g2 = g3[2 * stride];
    out[0] = g0;
    out[1] = 0.5f * (g0 + g1 + g2);
    out[2] = 0.5f * (g0 - g1 + g2);
    out[3] = g2;
  };
  for (int64_t i = 0; i < ci; ++i) {
    for (int64_t o = 0; o < co; ++o) {
      float k[27], t1[4 * 9], t2[4 * 4 * 3], t3[64];
      for (int64_t tap = 0; tap < 27; ++tap) k[tap] = w[(tap * ci + i) * cop + o];
      for (int64_t hw = 0; hw < 9; ++hw) {  // along depth: k[kd][hw] -> t1[a][hw]
        float out[4];
        g4(k + hw, 9, out);
        for (int a = 0; a < 4; ++a) t1[a * 9 + hw] = out[a];
      }
      for (int a = 0; a < 4; ++a) {  // along height: t1[a][kh][kw] -> t2[a][b][kw]
        for (int kw = 0; kw < 3; ++kw) {
          float out[4];
          g4(t1 + a * 9 + kw, 3, out);
          for (int b = 0; b < 4; ++b) t2[(a * 4 + b) * 3 + kw] = out[b];
        }
      }
      for (int ab = 0; ab < 16; ++ab) g4(t2 + ab * 3, 1, t3 + ab * 4);  // along width
      for (int p = 0; p < 64; ++p) v[p * WeightStride(ci, co) + i * co + o] = t3[p];
    }
  }
  return v;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")

// B^T along one axis of four vectors, in place.
inline void InputAxis(__m512& d0, __m512& d1, __m512& d2, __m512& d3) {
  const __m512 u0 = _mm512_sub_ps(d0, d2), u1 = _mm512_add_ps(d1, d2), u2 = _mm512_sub_ps(d2, d1),
               u3 = _mm512_sub_ps(d1, d3);
  d0 = u0, d1 = u1, d2 = u2, d3 = u3;
}

// U[p][t][ci0 .. ci0 + 16) of one tile from 4 x 4 rows (nullptr: zeros), its four columns starting `offset`
// floats into each row (2 t columns past the rows' virtual column 0, which is input column -1).
// One depth slice at a time in registers (width, then height), the depth axis from the four slices: the loads,
// the additions and U's 64 stores are all there is (a 4 x 4 x 4 array of vectors spilled three times over).
inline void InputTile(const float* const* rows, int64_t offset, int64_t ci, int64_t ci0, __mmask16 mask, float* u,
                      int64_t u_stride) {
  alignas(64) __m512 slice[4][16];
  offset += ci0;
  for (int a = 0; a < 4; ++a) {
    __m512 d[16];
    for (int b = 0; b < 4; ++b) {
      const float* r = rows[a * 4 + b];
      if (r == nullptr) {
        d[b * 4] = d[b * 4 + 1] = d[b * 4 + 2] = d[b * 4 + 3] = _mm512_setzero_ps();
        continue;
      }
      r += offset;
      d[b * 4] = _mm512_maskz_loadu_ps(mask, r);
      d[b * 4 + 1] = _mm512_maskz_loadu_ps(mask, r + ci);
      d[b * 4 + 2] = _mm512_maskz_loadu_ps(mask, r + 2 * ci);
      d[b * 4 + 3] = _mm512_maskz_loadu_ps(mask, r + 3 * ci);
      InputAxis(d[b * 4], d[b * 4 + 1], d[b * 4 + 2], d[b * 4 + 3]);
    }
    for (int c = 0; c < 4; ++c) InputAxis(d[c], d[4 + c], d[8 + c], d[12 + c]);
    for (int k = 0; k < 16; ++k) slice[a][k] = d[k];
  }
  for (int k = 0; k < 16; ++k) {  // k = b * 4 + c
    __m512 d0 = slice[0][k], d1 = slice[1][k], d2 = slice[2][k], d3 = slice[3][k];
    InputAxis(d0, d1, d2, d3);
    _mm512_mask_storeu_ps(u + k * u_stride + ci0, mask, d0);
    _mm512_mask_storeu_ps(u + (16 + k) * u_stride + ci0, mask, d1);
    _mm512_mask_storeu_ps(u + (32 + k) * u_stride + ci0, mask, d2);
    _mm512_mask_storeu_ps(u + (48 + k) * u_stride + ci0, mask, d3);
  }
}

// The same for channels that are a nearest-neighbour x2 upsampling of a coarse grid (a U-Net decoder's input),
// when tile t of every axis sits on coarse voxel t: its four inputs along an axis are L(t-1), L(t), L(t), L(t+1)
// (zero outside), so B^T d = (L(t-1) - L(t), 2 L(t), 0, L(t) - L(t+1)). The 27 positions without a 2 are computed
// from the 3 x 3 x 3 coarse neighbourhood; the other 37 are zero and never read (the products skip them).
// low[jd * 3 + jh]: coarse rows at offsets -1..1 (nullptr outside), `has_left`/`has_right`: coarse columns t-1
// and t+1 exist; ci: channels per coarse voxel, ci0 the 16 of them done here.
inline void InputTileUp(const float* const* low, int64_t t, bool has_left, bool has_right, int64_t ci, int64_t ci0,
                        float* u, int64_t u_stride) {
  const __mmask16 lm = has_left ? 0xFFFF : 0, rm = has_right ? 0xFFFF : 0;
  alignas(64) __m512 slice[3][9];
  for (int a = 0; a < 3; ++a) {
    __m512 d[9];
    for (int b = 0; b < 3; ++b) {
      const float* r = low[a * 3 + b];
      if (r == nullptr) {
        d[b * 3] = d[b * 3 + 1] = d[b * 3 + 2] = _mm512_setzero_ps();
        continue;
      }
      r += t * ci + ci0;
      const __m512 l = _mm512_maskz_loadu_ps(lm, r - ci), c = _mm512_loadu_ps(r), h = _mm512_maskz_loadu_ps(rm, r + ci);
      d[b * 3] = _mm512_sub_ps(l, c), d[b * 3 + 1] = _mm512_add_ps(c, c), d[b * 3 + 2] = _mm512_sub_ps(c, h);
    }
    for (int c = 0; c < 3; ++c) {
      const __m512 l = d[c], m = d[3 + c], h = d[6 + c];
      slice[a][c] = _mm512_sub_ps(l, m), slice[a][3 + c] = _mm512_add_ps(m, m), slice[a][6 + c] = _mm512_sub_ps(m, h);
    }
  }
  constexpr int kIndex[3] = {0, 1, 3};  // transformed index of the three nonzero outputs
  for (int b = 0; b < 3; ++b) {
    for (int c = 0; c < 3; ++c) {
      const __m512 l = slice[0][b * 3 + c], m = slice[1][b * 3 + c], h = slice[2][b * 3 + c];
      const int64_t k = kIndex[b] * 4 + kIndex[c];
      _mm512_storeu_ps(u + k * u_stride + ci0, _mm512_sub_ps(l, m));
      _mm512_storeu_ps(u + (16 + k) * u_stride + ci0, _mm512_add_ps(m, m));
      _mm512_storeu_ps(u + (48 + k) * u_stride + ci0, _mm512_sub_ps(m, h));
    }
  }
}

// True where position p has a transformed index 2 along some axis (zero for upsampled channels).
inline bool HasIndexTwo(int p) { return p / 16 == 2 || (p / 4) % 4 == 2 || p % 4 == 2; }

// m[i][co0 + 16 j] = sum_k u[i * TS + k] v[k][co0 + 16 j] for TB tiles i and CV vectors j of output channels.
// TS (U's floats per tile) is a compile-time constant so that every tile's broadcast is an immediate offset from
// one pointer: with a run-time stride the 14 tile pointers spilled out of the general registers.
template <int CV, int TB, int TS>
inline void GemmBlock(const float* u, int64_t ci, const float* v, int64_t co, float* m) {
  __m512 acc[TB * CV];
#pragma GCC unroll 32
  for (int i = 0; i < TB * CV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < ci; ++k, ++u, v += co) {
    const __m512 w0 = _mm512_loadu_ps(v);
    const __m512 w1 = CV == 2 ? _mm512_loadu_ps(v + 16) : w0;
#pragma GCC unroll 16
    for (int i = 0; i < TB; ++i) {
      const __m512 x = _mm512_set1_ps(u[i * TS]);
      acc[i * CV] = _mm512_fmadd_ps(x, w0, acc[i * CV]);
      if constexpr (CV == 2) acc[i * CV + 1] = _mm512_fmadd_ps(x, w1, acc[i * CV + 1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < TB; ++i) {
    _mm512_storeu_ps(m + i * co, acc[i * CV]);
    if constexpr (CV == 2) _mm512_storeu_ps(m + i * co + 16, acc[i * CV + 1]);
  }
}

// GemmBlock over n tiles (n <= kChunk), in blocks of 12 and one of the rest.
template <int CV, int TS>
inline void GemmTiles(int64_t n, const float* u, int64_t ci, const float* v, int64_t co, float* m) {
  constexpr int kMax = 12;
  int64_t i = 0;
  for (; i + kMax <= n; i += kMax) GemmBlock<CV, kMax, TS>(u + i * TS, ci, v, co, m + i * co);
  switch (n - i) {
#define CRD_WINO_CASE(R) \
  case R:                \
    return GemmBlock<CV, R, TS>(u + i * TS, ci, v, co, m + i * co);
    CRD_WINO_CASE(1) CRD_WINO_CASE(2) CRD_WINO_CASE(3) CRD_WINO_CASE(4) CRD_WINO_CASE(5) CRD_WINO_CASE(6)
    CRD_WINO_CASE(7) CRD_WINO_CASE(8) CRD_WINO_CASE(9) CRD_WINO_CASE(10) CRD_WINO_CASE(11)
#undef CRD_WINO_CASE
    default:
      return;
  }
}

// The 64 products of a chunk: M[p] = U[p] V[p] over all output channels.
// up_channels: the first channels are upsampled ones (InputTileUp), whose positions with an index 2 are zero.
template <int TS>
inline void ChunkProducts(int64_t n, const float* u, int64_t u_stride, int64_t ci, const float* v, int64_t co,
                          float* m, int64_t m_stride, int64_t up_channels) {
  for (int p = 0; p < 64; ++p) {
    const int64_t k0 = up_channels > 0 && HasIndexTwo(p) ? up_channels : 0;
    const float* up = u + p * u_stride + k0;
    const float* vp = v + p * WeightStride(ci, co) + k0 * co;
    float* mp = m + p * m_stride;
    int64_t co0 = 0;
    for (; co0 + 32 <= co; co0 += 32) GemmTiles<2, TS>(n, up, ci - k0, vp + co0, co, mp + co0);
    if (co0 < co) GemmTiles<1, TS>(n, up, ci - k0, vp + co0, co, mp + co0);
  }
}

// A^T along one axis: (m0 + m1 + m2, m1 - m2 - m3).
inline void OutputAxis(__m512 m0, __m512 m1, __m512 m2, __m512 m3, __m512& y0, __m512& y1) {
  y0 = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
  y1 = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
}

// The 2 x 2 x 2 outputs of tile t, channels co0 .. co0 + 16, from M[p][t][co]; bias, LeakyReLU, and stored where
// the output exists (out[r * 2 + s]: output row of depth offset r and height offset s, nullptr past the edge).
inline void OutputTile(const float* m, int64_t m_stride, int64_t co, int64_t co0, int64_t t, int64_t wo,
                       const float* bias, float slope, bool act, float* const* out) {
  __m512 z[4][4][2];  // after the width axis
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) {
      const float* p = m + ((a * 4 + b) * 4) * m_stride + t * co + co0;
      OutputAxis(_mm512_loadu_ps(p), _mm512_loadu_ps(p + m_stride), _mm512_loadu_ps(p + 2 * m_stride),
                 _mm512_loadu_ps(p + 3 * m_stride), z[a][b][0], z[a][b][1]);
    }
  }
  __m512 h[4][2][2];  // after the height axis
  for (int a = 0; a < 4; ++a)
    for (int c = 0; c < 2; ++c) OutputAxis(z[a][0][c], z[a][1][c], z[a][2][c], z[a][3][c], h[a][0][c], h[a][1][c]);
  const __m512 bv = _mm512_loadu_ps(bias + co0), sv = _mm512_set1_ps(slope), zero = _mm512_setzero_ps();
  for (int s = 0; s < 2; ++s) {
    for (int c = 0; c < 2; ++c) {
      __m512 y[2];
      OutputAxis(h[0][s][c], h[1][s][c], h[2][s][c], h[3][s][c], y[0], y[1]);
      const int64_t ow = 2 * t + c;
      if (ow >= wo) continue;
      for (int r = 0; r < 2; ++r) {
        float* row = out[r * 2 + s];
        if (row == nullptr) continue;
        __m512 v = _mm512_add_ps(y[r], bv);
        if (act) v = _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, sv);
        _mm512_storeu_ps(row + ow * co + co0, v);
      }
    }
  }
}

// U's floats per tile: the input channels rounded up to a whole vector.
inline int64_t TileFloats(int64_t ci) { return (ci + 15) / 16 * 16; }

// Per-thread buffers of one chunk of tiles: U[64][kChunk][TileFloats(ci)], M[64][kChunk][co].
struct Scratch {
  std::vector<float> u, m;
  Scratch(int64_t ci, int64_t co) : u(64 * (kChunk * TileFloats(ci) + kSkew)), m(64 * (kChunk * co + kSkew)) {}
};

// The input rows of one row of tiles, rows[a * 4 + b] at depth offset a and height offset b (nullptr where the
// row lies outside the volume). Tiles [t_lo, t_hi) read `inner`, whose virtual column 0 is input column -1, in
// place; tiles before t_lo read `left` (virtual columns [0, 2 t_lo + 2), zero-padded copies) and tiles from t_hi
// on read `right` (virtual columns [2 t_hi, 2 nt + 2)). Rows built padded pass t_lo = 0, t_hi = nt.
struct TileRows {
  const float* inner[16];
  const float* left[16];
  const float* right[16];
  int64_t t_lo, t_hi;
};

// Upsampled channels read from their coarse grid (InputTileUp) ahead of the rows' own channels: low[jd * 3 + jh]
// as there, `channels` (a multiple of 16) per coarse voxel, `columns` coarse voxels per row.
struct UpRows {
  const float* low[9];
  int64_t channels, columns;
};

// One row of tiles: nt tiles (output columns 0 .. wo - 1, two per tile) written to the four output rows
// out[r * 2 + s] (depth offset r, height offset s; nullptr past the volume's edge). co must be a multiple of 16.
// With `up`, the channels [0, up->channels) come from the coarse grid and the rows hold the remaining ci -
// up->channels channels per column.
inline void TileRow(const TileRows& in, int64_t ci, int64_t co, int64_t nt, int64_t wo, const float* v,
                    const float* bias, float slope, bool act, float* const* out, Scratch& s,
                    const UpRows* up = nullptr) {
  const int64_t up_ci = up ? up->channels : 0, row_ci = ci - up_ci;
  for (int64_t t0 = 0; t0 < nt; t0 += kChunk) {
    const int64_t n = std::min(kChunk, nt - t0);
    const int64_t ts = TileFloats(ci), u_stride = n * ts + kSkew, m_stride = n * co + kSkew;
    for (int64_t t = t0; t < t0 + n; ++t) {
      float* ut = s.u.data() + (t - t0) * ts;
      for (int64_t ci0 = 0; ci0 < up_ci; ci0 += 16)
        InputTileUp(up->low, t, t > 0, t + 1 < up->columns, up_ci, ci0, ut, u_stride);
      const float* const* rows = t < in.t_lo ? in.left : t >= in.t_hi ? in.right : in.inner;
      const int64_t offset = 2 * (t >= in.t_hi ? t - in.t_hi : t) * row_ci;
      for (int64_t ci0 = 0; ci0 < row_ci; ci0 += 16) {
        const __mmask16 mask = row_ci - ci0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (row_ci - ci0)) - 1);
        InputTile(rows, offset, row_ci, ci0, mask, ut + up_ci, u_stride);
      }
    }
    switch (ts) {
#define CRD_WINO_TS(TS) \
  case TS:              \
    ChunkProducts<TS>(n, s.u.data(), u_stride, ci, v, co, s.m.data(), m_stride, up_ci); \
    break;
      CRD_WINO_TS(16) CRD_WINO_TS(32) CRD_WINO_TS(48) CRD_WINO_TS(64) CRD_WINO_TS(80) CRD_WINO_TS(96)
      CRD_WINO_TS(112) CRD_WINO_TS(128)
#undef CRD_WINO_TS
    }
    for (int64_t t = 0; t < n; ++t) {
      // OutputTile indexes tiles from the chunk's start, the output columns from the row's.
      float* shifted[4];
      for (int k = 0; k < 4; ++k) shifted[k] = out[k] != nullptr ? out[k] + 2 * t0 * co : nullptr;
      for (int64_t co0 = 0; co0 < co; co0 += 16)
        OutputTile(s.m.data(), m_stride, co, co0, t, wo - 2 * t0, bias, slope, act, shifted);
    }
  }
}

// --- sum-pooled outputs: the input gradient of a convolution of a nearest x2 upsampled input -------------------
// d low = pool(conv^T(dy)): the 2 x 2 x 2 outputs of each tile summed (tile t of every axis is coarse voxel t).
// Along an axis the two rows of A^T sum to (1, 2, 0, -1), so only the 27 positions without an index 2 contribute,
// and only their products are computed: 27 instead of 64 multiply-adds per coarse voxel and channel pair.

// M[p] = U[p] V[p] for the 27 positions p without an index 2.
template <int TS>
inline void ChunkProductsPooled(int64_t n, const float* u, int64_t u_stride, int64_t ci, const float* v, int64_t co,
                                float* m, int64_t m_stride) {
  for (int p = 0; p < 64; ++p) {
    if (HasIndexTwo(p)) continue;
    const float* up = u + p * u_stride;
    const float* vp = v + p * WeightStride(ci, co);
    float* mp = m + p * m_stride;
    int64_t co0 = 0;
    for (; co0 + 32 <= co; co0 += 32) GemmTiles<2, TS>(n, up, ci, vp + co0, co, mp + co0);
    if (co0 < co) GemmTiles<1, TS>(n, up, ci, vp + co0, co, mp + co0);
  }
}

// The sum of tile t's 8 outputs, channels co0 .. co0 + 16, written to out[t * co + co0]: sum_p a(p) M[p] with
// a = (1, 2, 0, -1) along each axis (width, then height, then depth).
inline void OutputTilePooled(const float* m, int64_t m_stride, int64_t co, int64_t co0, int64_t t, float* out) {
  constexpr int kIdx[3] = {0, 1, 3};
  const __m512 two = _mm512_set1_ps(2.0f);
  __m512 depth[3];
  for (int ia = 0; ia < 3; ++ia) {
    __m512 height[3];
    for (int ib = 0; ib < 3; ++ib) {
      const float* p = m + ((kIdx[ia] * 4 + kIdx[ib]) * 4) * m_stride + t * co + co0;
      height[ib] = _mm512_sub_ps(_mm512_fmadd_ps(two, _mm512_loadu_ps(p + m_stride), _mm512_loadu_ps(p)),
                                 _mm512_loadu_ps(p + 3 * m_stride));
    }
    depth[ia] = _mm512_sub_ps(_mm512_fmadd_ps(two, height[1], height[0]), height[2]);
  }
  _mm512_storeu_ps(out + t * co + co0, _mm512_sub_ps(_mm512_fmadd_ps(two, depth[1], depth[0]), depth[2]));
}

// One row of tiles (TileRow's inputs), each tile's outputs summed into coarse voxel t of `out` (co floats each).
inline void TileRowPooled(const TileRows& in, int64_t ci, int64_t co, int64_t nt, const float* v, float* out,
                          Scratch& s) {
  for (int64_t t0 = 0; t0 < nt; t0 += kChunk) {
    const int64_t n = std::min(kChunk, nt - t0);
    const int64_t ts = TileFloats(ci), u_stride = n * ts + kSkew, m_stride = n * co + kSkew;
    for (int64_t t = t0; t < t0 + n; ++t) {
      float* ut = s.u.data() + (t - t0) * ts;
      const float* const* rows = t < in.t_lo ? in.left : t >= in.t_hi ? in.right : in.inner;
      const int64_t offset = 2 * (t >= in.t_hi ? t - in.t_hi : t) * ci;
      for (int64_t ci0 = 0; ci0 < ci; ci0 += 16) {
        const __mmask16 mask = ci - ci0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (ci - ci0)) - 1);
        InputTile(rows, offset, ci, ci0, mask, ut, u_stride);
      }
    }
    switch (ts) {
#define CRD_WINO_TS(TS) \
  case TS:              \
    ChunkProductsPooled<TS>(n, s.u.data(), u_stride, ci, v, co, s.m.data(), m_stride); \
    break;
      CRD_WINO_TS(16) CRD_WINO_TS(32) CRD_WINO_TS(48) CRD_WINO_TS(64) CRD_WINO_TS(80) CRD_WINO_TS(96)
      CRD_WINO_TS(112) CRD_WINO_TS(128)
#undef CRD_WINO_TS
    }
    for (int64_t t = 0; t < n; ++t)
      for (int64_t co0 = 0; co0 < co; co0 += 16) OutputTilePooled(s.m.data(), m_stride, co, co0, t, out + t0 * co);
  }
}

#pragma GCC pop_options

}  // namespace crd::winograd
