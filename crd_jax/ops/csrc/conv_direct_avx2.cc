// The forward tiles for AVX2 + FMA, which every supported CPU runs: 8 output channels per vector, 16 registers.
//
// Also the few-output-channel kernel (the flow head) on CPUs without AVX-512 or where C_in is not a multiple of
// 16, and LeakyRow, the activation the AVX2 tiles apply after a row. Everything here is in crd::avx2.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_common.h"
#include "parallel.h"

namespace crd::avx2 {

// Accumulates TW consecutive output voxels x CB*8 output channels over every tap of the row set.
template <int CB, int TW>
inline void FwdTile(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t ow0,
                    int64_t co0, float* yrow) {
  __m256 acc[TW][CB];
  const int64_t co_valid = std::min<int64_t>(CB * 8, g.Co - co0);
#pragma GCC unroll 16
  for (int c = 0; c < CB; ++c) {
    const int64_t valid = co_valid - 8 * c;
    __m256 bv;
    if (valid >= 8) {
      bv = _mm256_loadu_ps(bias + co0 + 8 * c);
    } else if (valid > 0) {
      bv = _mm256_maskload_ps(bias + co0 + 8 * c, TailMask(static_cast<int>(valid)));
    } else {
      bv = _mm256_setzero_ps();
    }
#pragma GCC unroll 16
    for (int t = 0; t < TW; ++t) acc[t][c] = bv;
  }
  const int64_t Ci = g.Ci, CoP = g.CoP;
  const int64_t xstep = g.sw * Ci;
  for (int r = 0; r < rs.n; ++r) {
    const float* xrow = rs.rows[r] + ow0 * xstep;
    const float* wtap = w + rs.taps[r] * g.KW * Ci * CoP + co0;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const float* wp = wtap + kw * Ci * CoP;
      const float* xp = xrow + kw * Ci;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        __m256 wv[CB];
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) wv[c] = _mm256_loadu_ps(wp + ci * CoP + 8 * c);
#pragma GCC unroll 16
        for (int t = 0; t < TW; ++t) {
          const __m256 xv = _mm256_broadcast_ss(xp + t * xstep + ci);
#pragma GCC unroll 16
          for (int c = 0; c < CB; ++c) acc[t][c] = _mm256_fmadd_ps(xv, wv[c], acc[t][c]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < TW; ++t) {
    float* yp = yrow + (ow0 + t) * g.Co + co0;
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) {
      const int64_t valid = co_valid - 8 * c;
      if (valid >= 8) {
        _mm256_storeu_ps(yp + 8 * c, acc[t][c]);
      } else if (valid > 0) {
        _mm256_maskstore_ps(yp + 8 * c, TailMask(static_cast<int>(valid)), acc[t][c]);
      }
    }
  }
}

template <int CB>
struct Avx2Tile {
  const Geometry& g;
  const RowSet& rs;
  const float *w, *bias;
  int64_t co0;
  float* yrow;
  template <int TW>
  void run(int64_t ow) const { FwdTile<CB, TW>(g, rs, w, bias, ow, co0, yrow); }
};

// LeakyReLU in place over a row; kept out of the tile so the tile's registers all hold partial sums.
void LeakyRow(float* y, int64_t n, float slope) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 sl = _mm256_set1_ps(slope);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(sl, _mm256_min_ps(v, zero), _mm256_max_ps(v, zero)));
  }
  for (; i < n; ++i) y[i] = y[i] >= 0.0f ? y[i] : slope * y[i];
}

// --- few output channels (the flow head: C_out = 2 or 3), stride 1 along W -----------------------------
//
// With C_out < 8 a vector of output channels would be mostly empty. Instead each vector holds 8 output
// columns of one channel: the input rows are kept transposed ("planar", [C_in][W]), so 8 consecutive
// columns of one input channel are one load. Transposed rows are cached by (batch, depth, row): moving
// to the next output row only transposes the KD rows that enter the window.

constexpr int kSmallCoTile = 4;  // vectors of 8 columns per tile

template <int CO>
inline void SmallCoTile(const Geometry& g, const float* const* rows, const int64_t* taps, int nrows, int64_t stride,
                        const float* w, const float* bias, int64_t ow0, float* yrow) {
  constexpr int NB = kSmallCoTile;
  __m256 acc[CO][NB];
#pragma GCC unroll 16
  for (int c = 0; c < CO; ++c) {
    const __m256 bv = _mm256_set1_ps(bias[c]);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[c][j] = bv;
  }
  const int64_t Ci = g.Ci, CoP = g.CoP;
  for (int r = 0; r < nrows; ++r) {
    const float* wtap = w + taps[r] * g.KW * Ci * CoP;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const float* wk = wtap + kw * Ci * CoP;
      const float* xk = rows[r] + ow0 + kw;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        __m256 wv[CO];
#pragma GCC unroll 16
        for (int c = 0; c < CO; ++c) wv[c] = _mm256_broadcast_ss(wk + ci * CoP + c);
        const float* xp = xk + ci * stride;
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) {
          const __m256 xv = _mm256_loadu_ps(xp + 8 * j);
#pragma GCC unroll 16
          for (int c = 0; c < CO; ++c) acc[c][j] = _mm256_fmadd_ps(xv, wv[c], acc[c][j]);
        }
      }
    }
  }
  alignas(32) float tmp[CO][8 * NB];
#pragma GCC unroll 16
  for (int c = 0; c < CO; ++c)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) _mm256_store_ps(tmp[c] + 8 * j, acc[c][j]);
  const int64_t n = std::min<int64_t>(8 * NB, g.Wo - ow0);
  for (int64_t t = 0; t < n; ++t)
    for (int c = 0; c < CO; ++c) yrow[(ow0 + t) * CO + c] = tmp[c][t];
}

template <int CO>
void SmallCoForwardT(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                     float* y) {
  const int64_t planes = g.B * g.Do;
  const int64_t tile = 8 * kSmallCoTile;
  const int64_t tiles = (g.Wo + tile - 1) / tile;
  // Planar row: pw zeros, the W input columns, zeros up to every column a tile may read.
  const int64_t stride = std::max(tiles * tile + g.KW, g.pw + g.W);
  const int64_t nslots = g.KD * (g.KH + 1);
  ParallelFor(planes, NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> slots(nslots * g.Ci * stride, 0.0f);
    std::vector<int64_t> key(nslots, -1);
    std::vector<int64_t> last_use(nslots, -1);
    int64_t clock = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / g.Do, od = p % g.Do;
      for (int64_t oh = 0; oh < g.Ho; ++oh, ++clock) {
        const float* rows[64];
        int64_t taps[64];
        int n = 0;
        for (int64_t kd = 0; kd < g.KD; ++kd) {
          const int64_t id = od * g.sd - g.pd + kd;
          if (id < 0 || id >= g.D) continue;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.sh - g.ph + kh;
            if (ih < 0 || ih >= g.H) continue;
            const int64_t k = (b * g.D + id) * g.H + ih;
            int64_t s = -1;
            for (int64_t i = 0; i < nslots; ++i)
              if (key[i] == k) s = i;
            if (s < 0) {  // least recently used slot; those of this output row were just stamped
              s = 0;
              for (int64_t i = 1; i < nslots; ++i)
                if (last_use[i] < last_use[s]) s = i;
              float* dst = slots.data() + s * g.Ci * stride + g.pw;
              const float* src = x + k * g.W * g.Ci;
              for (int64_t iw = 0; iw < g.W; ++iw)
                for (int64_t ci = 0; ci < g.Ci; ++ci) dst[ci * stride + iw] = src[iw * g.Ci + ci];
              key[s] = k;
            }
            last_use[s] = clock;
            rows[n] = slots.data() + s * g.Ci * stride;
            taps[n] = kd * g.KH + kh;
            ++n;
          }
        }
        float* yrow = y + ((b * g.Do + od) * g.Ho + oh) * g.Wo * g.Co;
        for (int64_t t = 0; t < tiles; ++t) SmallCoTile<CO>(g, rows, taps, n, stride, w, bias, t * tile, yrow);
        if (act) LeakyRow(yrow, g.Wo * g.Co, slope);
      }
    }
  });
}

void SmallCoForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                    float* y) {
  switch (g.Co) {
    case 1: return SmallCoForwardT<1>(g, x, w, bias, slope, act, y);
    case 2: return SmallCoForwardT<2>(g, x, w, bias, slope, act, y);
    case 3: return SmallCoForwardT<3>(g, x, w, bias, slope, act, y);
    case 4: return SmallCoForwardT<4>(g, x, w, bias, slope, act, y);
  }
}

// AVX2: tiles of 16 output channels x 6 columns (12 accumulators), 8 x 12 for the last 8 channels.
void Avx2Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin, int64_t end,
                 float, bool, float* yrow) {
  if (begin >= end) return;
  int64_t co0 = 0;
  for (; co0 + 16 <= g.CoP; co0 += 16) TileColumns<6, 3>(begin, begin, end, Avx2Tile<2>{g, rs, w, bias, co0, yrow});
  for (; co0 < g.CoP; co0 += 8) TileColumns<12, 6>(begin, begin, end, Avx2Tile<1>{g, rs, w, bias, co0, yrow});
}

}  // namespace crd::avx2
