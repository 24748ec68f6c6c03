// Direct 3-D convolution for x86-64 CPUs with AVX2 + FMA (and an AVX-512 forward path where the CPU has
// it), exposed to XLA as FFI custom calls.
//
// Why this exists: XLA's CPU backend runs 3^3 convolutions at ~15 GFLOP/s on the 2-core machines this
// project targets, and an im2col + dot formulation is bounded by the memory traffic of the 27x patch
// matrix. A register-blocked direct convolution reads each input voxel from cache and keeps the partial
// sums in registers, which is what oneDNN does for PyTorch.
//
// Stride-1 3^3 layers with output channels in multiples of 16 run as Winograd F(2x2x2, 3x3x3) on AVX-512
// (winograd.h): 64 instead of 216 multiply-adds per 2x2x2 outputs and channel pair.
//
// Forward pass: each output row reads its KD x KH input rows in place (only the few columns at either end
// read a zero-padded copy); tiles of output columns x output channels keep their partial sums in
// registers; output rows are visited in bands that keep the input rows they share in the L2 cache.
//
// Layout: channels-last. Input x (B, D, H, W, Ci); weights (KD, KH, KW, Ci, CoP) with the output channels
// zero-padded to CoP, a multiple of 8; output (B, Do, Ho, Wo, Co). 2-D convolutions are passed as D = 1,
// KD = 1. Padding is explicit (low side); out-of-range taps read zeros, as in lax.conv_general_dilated.
//
// Three entry points:
//   crd_conv_fwd: y = act(conv(x, w) + b), act = LeakyReLU(slope) or identity.
//   crd_conv_wgrad: dw[k, ci, co] = sum_{b, o} x[b, o * s - p + k, ci] * dy[b, o, co].
//   (the input gradient of a stride-1 convolution is crd_conv_fwd on dy with flipped, transposed weights.)
#include <immintrin.h>

#include <cpuid.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "winograd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using crd::NumThreads;
using crd::ParallelFor;

struct Geometry {
  int64_t B, D, H, W, Ci;
  int64_t Do, Ho, Wo, Co, CoP;
  int64_t KD, KH, KW;
  int64_t sd, sh, sw;
  int64_t pd, ph, pw;
};

// Which vector width the forward kernel uses: AVX-512 where the CPU has it, unless CRD_JAX_ISA=avx2 (or
// crd_set_isa) asks for the AVX2 path, which every supported CPU runs.
enum Isa { kAvx2 = 0, kAvx512 = 1 };

bool CpuHasBf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}

bool CpuHasAvx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"); }

std::atomic<int>& IsaSetting() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("CRD_JAX_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return static_cast<int>(kAvx2);
    return static_cast<int>(CpuHasAvx512() ? kAvx512 : kAvx2);
  }()};
  return isa;
}

int ActiveIsa() { return IsaSetting().load(std::memory_order_relaxed); }

constexpr int64_t kBandBytes = 768 * 1024;  // input rows a band of output rows may keep in the L2 cache
constexpr int kTile512K3 = 24;   // AVX-512 columns per tile: 16 output channels, stride 1, 3 taps
constexpr int kTile512Cb1 = 24;  // 16 output channels, other strides
constexpr int kTile512Cb2 = 12;  // 32 output channels

inline __m256i TailMask(int valid) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - valid));
}

// The input rows one output row reads, each copied into a W-padded scratch row so that every output
// column sees all KW taps (out-of-volume columns read the zero padding). rows[i] belongs to the
// (kd, kh) tap taps[i]; taps whose row lies outside the volume are simply absent.
struct RowSet {
  const float* rows[64];
  int64_t taps[64];
  int n = 0;
};

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

// Runs tile(ow, width) over columns [begin, end): tiles of TW, the remainder in tiles of TW / 2, ... down to
// kMin, and what is left as one more kMin-wide tile that ends at `end`, overlapping columns already done
// (it writes the same values). Narrower tiles have too few independent FMA chains to hide the FMA latency;
// only a range narrower than kMin falls through to them.
template <int TW, int kMin, typename Tile>
void TileColumns(int64_t range_begin, int64_t begin, int64_t end, const Tile& tile) {
  int64_t ow = begin;
  for (; ow + TW <= end; ow += TW) tile.template run<TW>(ow);
  if (ow == end) return;
  if constexpr (TW > kMin) {
    TileColumns<TW / 2, kMin>(range_begin, ow, end, tile);
  } else if (end - range_begin >= TW) {
    tile.template run<TW>(end - TW);
  } else if constexpr (TW > 1) {
    TileColumns<TW / 2, 1>(range_begin, ow, end, tile);
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
void SmallCoForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act, float* y) {
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

// The input rows under output row (b, od, oh): every (kd, kh) tap whose row lies inside the volume (rows in
// the zero padding contribute nothing and are left out), each with the pointer row(b, id, ih) gives it.
template <typename RowPointer>
inline RowSet InputRows(const Geometry& g, int64_t b, int64_t od, int64_t oh, RowPointer row) {
  RowSet rs;
  for (int64_t kd = 0; kd < g.KD; ++kd) {
    const int64_t id = od * g.sd - g.pd + kd;
    if (id < 0 || id >= g.D) continue;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.sh - g.ph + kh;
      if (ih < 0 || ih >= g.H) continue;
      rs.rows[rs.n] = row(b, id, ih);
      rs.taps[rs.n++] = kd * g.KH + kh;
    }
  }
  return rs;
}

// The rows of a channels-last input x, read in place (first column).
inline RowSet InputRows(const Geometry& g, const float* x, int64_t b, int64_t od, int64_t oh) {
  return InputRows(g, b, od, oh, [&](int64_t bb, int64_t id, int64_t ih) {
    return x + ((bb * g.D + id) * g.H + ih) * g.W * g.Ci;
  });
}

// Output rows are visited in blocks of this many rows, every depth of a thread's planes in turn for each
// block, so that the input rows a band reads (KD planes x (band + KH - 1) rows) stay in the L2 cache while
// the next depth reuses KD - 1 of its planes: each input row is fetched from memory about once instead of
// KD times (plane by plane, a plane's rows were evicted before the next depth came back).
inline int64_t BandRows(const Geometry& g) {
  const int64_t row_bytes = g.W * g.Ci * static_cast<int64_t>(sizeof(float));
  const int64_t band_rows = kBandBytes / std::max<int64_t>(1, g.KD * row_bytes * g.sh);
  return std::clamp<int64_t>(band_rows - (g.KH - 1), 1, g.Ho);
}

// --- AVX-512 (16 lanes): same loop nest, 16 output channels per vector, 32 registers for partial sums ---
//
// Compiled for AVX-512 whatever the file's flags; only called when the CPU has it (ActiveIsa).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")

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

// TW consecutive output voxels x CB*16 output channels; the activation is applied in registers. With kBf16
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

double Bf16MulAddSpeedup() {
  constexpr int64_t kIters = 1 << 19;
  double fp32 = 1e30, bf16 = 1e30;
  for (int round = 0; round < 3; ++round) {  // the fastest of three: the machine's rate, not its noise
    fp32 = std::min(fp32, TimedMulAddChains<false>(kIters));
    bf16 = std::min(bf16, TimedMulAddChains<true>(kIters));
  }
  return 2.0 * fp32 / bf16;
}

#pragma GCC pop_options

// --- AMX (Intel Sapphire Rapids and later): the bf16 tiles as tile-register matrix products ---------------
//
// TDPBF16PS multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into 16 x 16 float32 sums: on a Sapphire
// Rapids-class Xeon ~16x the multiply-adds per second of AVX-512 FMAs, where VDPBF16PS runs at half the FMA
// rate. The bf16 layout of this file is already the one AMX reads: a row of A is one output column's input
// channels (pairs of bfloat16, consecutive columns sw * Ci words apart, read in place), a row of B one pair of
// input channels for 16 output channels (the packed weights, CoP words apart). Same values as the VDPBF16PS
// tiles up to the order of the float32 sums.
//
// Linux hands out the tile registers only after the process asks (arch_prctl ARCH_REQ_XCOMP_PERM); each
// thread configures its tiles (LDTILECFG) at the start of a row and releases them at the end, so that threads
// that never run a tile keep the small register state on context switches.

// The AMX intrinsics need GCC 11 or clang 12; older compilers (or -DCRD_AMX=0) build everything else.
#ifndef CRD_AMX
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define CRD_AMX 1
#else
#define CRD_AMX 0
#endif
#endif

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

bool CpuHasAmxBf16() {
  if (!CRD_AMX) return false;
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (!tile || !bf16 || !CpuHasBf16()) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Which engine runs the bf16 tiles: AMX where the CPU and the kernel allow it, unless CRD_JAX_BF16_ENGINE=avx512
// (or crd_set_bf16_engine) asks for the VDPBF16PS tiles, which every AVX512-BF16 CPU runs.
enum Bf16Engine { kBf16Avx512 = 0, kBf16Amx = 1 };

std::atomic<int>& Bf16EngineSetting() {
  static std::atomic<int> engine{[] {
    const char* env = std::getenv("CRD_JAX_BF16_ENGINE");
    if (env != nullptr && std::strcmp(env, "avx512") == 0) return static_cast<int>(kBf16Avx512);
    return static_cast<int>(CpuHasAmxBf16() ? kBf16Amx : kBf16Avx512);
  }()};
  return engine;
}

int ActiveBf16Engine() { return Bf16EngineSetting().load(std::memory_order_relaxed); }

#if CRD_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;  // palette 0: no configuration (the tiles are released)
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 the sums of output columns [ow, ow + 16) and [ow + 16, ow + 32) x n output channels; 2, 3 their
// inputs for a chunk of 16 (tap, channel pair)s (64 bytes a row); 4, 5 the same for the last kt < 16; 6, 7 the
// weights of a full and of the last chunk.
TileConfig AmxConfig(int64_t n, int64_t kt) {
  TileConfig c;
  for (int t : {0, 1}) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(4 * n);
  for (int t : {2, 3}) c.rows[t] = 16, c.colsb[t] = 64;
  if (kt > 0) {
    for (int t : {4, 5}) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(4 * kt);
    c.rows[7] = static_cast<uint8_t>(kt), c.colsb[7] = static_cast<uint16_t>(4 * n);
  }
  c.rows[6] = 16, c.colsb[6] = static_cast<uint16_t>(4 * n);
  return c;
}

// bias + sums (+ LeakyReLU) of a 16 x n tile of float32 sums, for the output columns [ow0, ow0 + 16).
inline void AmxStore(const Geometry& g, const float* sums, const float* bias, int64_t ow0, int64_t co0, int64_t n,
                     float slope, bool act, float* yrow) {
  const __mmask16 mask = LaneMask(std::min(n, g.Co - co0));
  const __m512 bv = _mm512_maskz_loadu_ps(mask, bias + co0), zero = _mm512_setzero_ps(), sl = _mm512_set1_ps(slope);
  for (int m = 0; m < 16; ++m) {
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sums + 16 * m), bv);
    if (act) v = _mm512_fmadd_ps(sl, _mm512_min_ps(v, zero), _mm512_max_ps(v, zero));
    _mm512_mask_storeu_ps(yrow + (ow0 + m) * g.Co + co0, mask, v);
  }
}

// Output columns [ow0, ow0 + 16 * (1 + kTwo)) x output channels [co0, co0 + n), every tap of the row set. The
// KW taps of a row are one product: an output column's KW input columns lie side by side (KW * Ci words, as
// their weights do), so a tile row spans taps, and a 16-channel layer fills the 32 bfloat16 of a tile row
// instead of half of it.
template <bool kTwo>
void AmxBlock(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t ow0, int64_t co0,
              int64_t n, float slope, bool act, float* yrow) {
  const int64_t Ci = g.Ci, CoP = g.CoP, K = g.KW * Ci, kfull = K / 16 * 16;
  const int64_t a_stride = g.sw * Ci * 4, b_stride = CoP * 4, half = 16 * g.sw * Ci;
  _tile_zero(0);
  if constexpr (kTwo) _tile_zero(1);
  for (int r = 0; r < rs.n; ++r) {
    const float* xp = rs.rows[r] + ow0 * g.sw * Ci;
    const float* wp = w + rs.taps[r] * K * CoP + co0;
    for (int64_t k = 0; k < kfull; k += 16) {
      _tile_loadd(6, wp + k * CoP, b_stride);
      _tile_loadd(2, xp + k, a_stride);
      _tile_dpbf16ps(0, 2, 6);
      if constexpr (kTwo) {
        _tile_loadd(3, xp + half + k, a_stride);
        _tile_dpbf16ps(1, 3, 6);
      }
    }
    if (kfull < K) {
      _tile_loadd(7, wp + kfull * CoP, b_stride);
      _tile_loadd(4, xp + kfull, a_stride);
      _tile_dpbf16ps(0, 4, 7);
      if constexpr (kTwo) {
        _tile_loadd(5, xp + half + kfull, a_stride);
        _tile_dpbf16ps(1, 5, 7);
      }
    }
  }
  alignas(64) float sums[16 * 16];
  _tile_stored(0, sums, 64);
  AmxStore(g, sums, bias, ow0, co0, n, slope, act, yrow);
  if constexpr (kTwo) {
    _tile_stored(1, sums, 64);
    AmxStore(g, sums, bias, ow0 + 16, co0, n, slope, act, yrow);
  }
}

// The configuration this thread's tiles hold (LDTILECFG costs about as much as a small row's products, so it is
// loaded only when it changes); EndTiles releases the tiles at the end of a convolution's work on a thread.
thread_local TileConfig loaded_tiles{0};

void UseTiles(const TileConfig& cfg) {
  if (std::memcmp(&cfg, &loaded_tiles, sizeof(TileConfig)) == 0) return;
  _tile_loadconfig(&cfg);
  loaded_tiles = cfg;
}

void EndTiles() {
  if (loaded_tiles.palette == 0) return;
  _tile_release();
  loaded_tiles = TileConfig{0};
}

// Ranges narrower than one tile (16 columns) run on the VDPBF16PS tiles; wider ones in blocks of 32 columns,
// the last block (of 32 or 16) ending at `end` and overlapping columns already done (it writes the same
// values), as TileColumns does.
void AmxBf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                    int64_t end, float slope, bool act, float* yrow) {
  if (end - begin < 16) return Avx512Bf16Columns(g, rs, w, bias, begin, end, slope, act, yrow);
  const int64_t kt = g.KW * g.Ci % 16;
  for (int64_t co0 = 0; co0 < g.Co; co0 += 16) {
    const int64_t n = std::min<int64_t>(16, g.CoP - co0);
    UseTiles(AmxConfig(n, kt));
    if (end - begin < 32) {
      AmxBlock<false>(g, rs, w, bias, begin, co0, n, slope, act, yrow);
      if (begin + 16 < end) AmxBlock<false>(g, rs, w, bias, end - 16, co0, n, slope, act, yrow);
    } else {
      int64_t ow = begin;
      for (; ow + 32 <= end; ow += 32) AmxBlock<true>(g, rs, w, bias, ow, co0, n, slope, act, yrow);
      if (end - ow > 16) {
        AmxBlock<true>(g, rs, w, bias, end - 32, co0, n, slope, act, yrow);
      } else if (ow < end) {
        AmxBlock<false>(g, rs, w, bias, end - 16, co0, n, slope, act, yrow);
      }
    }
  }
}

// TDPBF16PS multiply-adds per second (4 independent tiles) over float32 FMA multiply-adds per second.
double AmxMulAddSpeedup() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  alignas(64) static const uint16_t zeros[16 * 32] = {};  // the values do not change the rate
  constexpr int64_t kIters = 1 << 14;
  double fp32 = 1e30, amx = 1e30;
  for (int round = 0; round < 3; ++round) {
    fp32 = std::min(fp32, TimedMulAddChains<false>(1 << 19) / (1 << 19) / (24.0 * 16));
    UseTiles(cfg);
    _tile_loadd(4, zeros, 64);
    _tile_loadd(5, zeros, 64);
    _tile_loadd(6, zeros, 64);
    _tile_loadd(7, zeros, 64);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < kIters; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    alignas(64) static float sink[256];
    _tile_stored(0, sink, 64);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EndTiles();
    amx = std::min(amx, seconds / kIters / (4.0 * 16 * 16 * 32));
  }
  return fp32 / amx;
}

#pragma GCC pop_options
#else
void AmxBf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                    int64_t end, float slope, bool act, float* yrow) {
  Avx512Bf16Columns(g, rs, w, bias, begin, end, slope, act, yrow);
}
void EndTiles() {}
double AmxMulAddSpeedup() { return 0.0; }
#endif  // CRD_AMX

// Output columns whose every tap lies inside the input row: they read the input in place. The few columns at
// either end read a small zero-padded copy of the columns they need (the "edge" row sets).
struct ColumnRanges {
  int64_t interior_begin, interior_end;  // [L, R)
  int64_t left_width, right_first, right_width;  // virtual padded columns copied for the edges
};

// The edges are at least `edge` columns wide, so that they run in tiles as efficient as the interior's: 8 for
// the vector tiles, 16 (one tile's rows) for AMX.
constexpr int64_t kEdgeColumns = 8;
constexpr int64_t kAmxEdgeColumns = 16;

ColumnRanges Columns(const Geometry& g, int64_t edge) {
  ColumnRanges c;
  const int64_t first_inside = std::min(g.Wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t last = g.W - g.KW + g.pw;  // largest ow * sw that stays inside
  const int64_t end_inside = last >= 0 ? std::min(g.Wo, last / g.sw + 1) : 0;
  c.interior_begin = std::min(g.Wo, std::max(first_inside, first_inside > 0 ? edge : 0));
  c.interior_end = std::max(c.interior_begin, std::min(end_inside, end_inside < g.Wo ? g.Wo - edge : g.Wo));
  c.left_width = c.interior_begin > 0 ? (c.interior_begin - 1) * g.sw + g.KW : 0;
  c.right_first = c.interior_end * g.sw;
  c.right_width = c.interior_end < g.Wo ? (g.Wo - 1 - c.interior_end) * g.sw + g.KW : 0;
  return c;
}

// Copies virtual padded columns [first, first + width) of an input row (virtual column c is input column
// c - pw; outside the row, zeros) to buf, and returns the pointer that virtual column 0 would have.
const float* EdgeRow(const Geometry& g, const float* xrow, int64_t first, int64_t width, float* buf) {
  // Columns [c0, c1) of the copy lie inside the row: one copy for them, zeros on either side (a call per column
  // cost more than the copying on rows of a few channels).
  const int64_t c0 = std::clamp<int64_t>(g.pw - first, 0, width);
  const int64_t c1 = std::clamp<int64_t>(g.W + g.pw - first, c0, width);
  std::memset(buf, 0, c0 * g.Ci * sizeof(float));
  std::memcpy(buf + c0 * g.Ci, xrow + (first + c0 - g.pw) * g.Ci, (c1 - c0) * g.Ci * sizeof(float));
  std::memset(buf + c1 * g.Ci, 0, (width - c1) * g.Ci * sizeof(float));
  return buf - first * g.Ci;
}

using ColumnsFn = void (*)(const Geometry&, const RowSet&, const float*, const float*, int64_t, int64_t, float, bool,
                           float*);

// AVX2: tiles of 16 output channels x 6 columns (12 accumulators), 8 x 12 for the last 8 channels.
void Avx2Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin, int64_t end,
                 float, bool, float* yrow) {
  if (begin >= end) return;
  int64_t co0 = 0;
  for (; co0 + 16 <= g.CoP; co0 += 16) TileColumns<6, 3>(begin, begin, end, Avx2Tile<2>{g, rs, w, bias, co0, yrow});
  for (; co0 < g.CoP; co0 += 8) TileColumns<12, 6>(begin, begin, end, Avx2Tile<1>{g, rs, w, bias, co0, yrow});
}

// The column kernel of a forward pass: bf16 tiles (AMX, else AVX512-BF16), else the active vector width's.
ColumnsFn ColumnsFor(bool bf16) {
  if (bf16) return ActiveBf16Engine() == kBf16Amx ? AmxBf16Columns : Avx512Bf16Columns;
  return ActiveIsa() == kAvx512 ? Avx512Columns : Avx2Columns;
}

// --- the decoder's first convolution, conv(concat(up(low), skip)), without the concatenation ---------------
//
// A U-Net decoder upsamples its coarse features x2 (nearest neighbour, cropped to the skip's size) and
// concatenates them with the skip connection before a stride-1 convolution. Materialised by XLA, that input
// is the largest tensor of the network (34 channels at full resolution for VM): written once, page-faulted
// in and read back. Here each thread builds the concatenated, zero-padded input rows of its band of output
// rows into an L2-sized buffer (each depth plane's rows once per band, KD planes in a ring) and runs the
// ordinary tiles on them; every column is then an interior column.
struct Upcat {
  const float* low;  // (B, Dl, Hl, Wl, Cl), the coarse features, repeated x2 along each axis and cropped
  int64_t Dl, Hl, Wl, Cl;
  const float* skip;  // (B, D, H, W, Cs); the concatenation is [up(low), skip] along channels
  int64_t Cs;
};

// dst[0, n) = src[0, n) for the few dozen channels of one voxel, inline: two memcpy calls per voxel cost more than
// the copying when a decoder's input rows are built (VM's last level: 2 skip channels per voxel).
inline void CopyFloats(float* dst, const float* src, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
  if (k < n) {
    const __m256i mask = TailMask(static_cast<int>(n - k));
    _mm256_maskstore_ps(dst + k, mask, _mm256_maskload_ps(src + k, mask));
  }
}

// Row (b, id, ih) of concat(up(low), skip) with its zero padding: virtual columns [0, width) of ci floats
// each (ci >= Cl + Cs; the rest zero), column c being input column c - pw.
void BuildUpcatRow(const Geometry& g, const Upcat& u, int64_t b, int64_t id, int64_t ih, int64_t width, int64_t ci,
                   float* dst) {
  const float* low_row = u.low + ((b * u.Dl + id / 2) * u.Hl + ih / 2) * u.Wl * u.Cl;
  const float* skip_row = u.skip + ((b * g.D + id) * g.H + ih) * g.W * u.Cs;
  for (int64_t c = 0; c < width; ++c, dst += ci) {
    const int64_t iw = c - g.pw;
    if (iw < 0 || iw >= g.W) {
      std::memset(dst, 0, ci * sizeof(float));
      continue;
    }
    CopyFloats(dst, low_row + (iw / 2) * u.Cl, u.Cl);
    CopyFloats(dst + u.Cl, skip_row + iw * u.Cs, u.Cs);
    if (ci > u.Cl + u.Cs) std::memset(dst + u.Cl + u.Cs, 0, (ci - u.Cl - u.Cs) * sizeof(float));
  }
}

// --- Winograd F(2x2x2, 3x3x3) for the stride-1 3^3 layers (winograd.h) --------------------------------------
//
// On by default where it applies (AVX-512, float32, 3^3 kernel, stride 1, padding 1, output channels a multiple
// of 16); CRD_JAX_WINOGRAD=0 or crd_set_winograd(0) keeps the direct kernel (for comparisons and tests).
std::atomic<int>& WinogradSetting() {
  static std::atomic<int> on{[] {
    const char* env = std::getenv("CRD_JAX_WINOGRAD");
    return env != nullptr && std::strcmp(env, "0") == 0 ? 0 : 1;
  }()};
  return on;
}

std::atomic<int64_t>& WinogradCalls() {  // convolutions that took the Winograd path (tests check the dispatch)
  static std::atomic<int64_t> calls{0};
  return calls;
}

bool WinogradApplies(const Geometry& g, bool bf16) {
  return !bf16 && WinogradSetting().load(std::memory_order_relaxed) != 0 && ActiveIsa() == kAvx512 &&
         g.KD == 3 && g.KH == 3 && g.KW == 3 && g.sd == 1 && g.sh == 1 && g.sw == 1 && g.pd == 1 && g.ph == 1 &&
         g.pw == 1 && g.Do == g.D && g.Ho == g.H && g.Wo == g.W && g.Co % 16 == 0 && g.CoP == g.Co &&
         g.Ci <= crd::winograd::kMaxChannels;
}

// Output rows of tile row (b, td, th): out[r * 2 + s] is output row (2 td + r, 2 th + s), nullptr past the edge.
void WinogradOutputRows(const Geometry& g, float* y, int64_t b, int64_t td, int64_t th, float** out) {
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t s = 0; s < 2; ++s) {
      const int64_t od = 2 * td + r, oh = 2 * th + s;
      out[r * 2 + s] = od < g.Do && oh < g.Ho ? y + ((b * g.Do + od) * g.Ho + oh) * g.Wo * g.Co : nullptr;
    }
  }
}

// Tile rows per band: the 4 input planes of a tile plane x (2 band + 2) rows stay in the L2 cache while the
// threads' tile planes advance through them (as the direct kernel's bands do).
int64_t WinogradBand(const Geometry& g, int64_t row_floats) {
  const int64_t row_bytes = row_floats * static_cast<int64_t>(sizeof(float));
  return std::clamp<int64_t>((kBandBytes / (4 * row_bytes) - 2) / 2, 1, (g.Ho + 1) / 2);
}

// Tiles of 2 x 2 x 2 outputs over a channels-last input read in place: threads take planes of tiles (two
// output depths), in bands of tile rows; only the first and last tiles of a row read zero-padded copies of the
// few columns they need.
void WinogradForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                     float* y) {
  WinogradCalls().fetch_add(1, std::memory_order_relaxed);
  const std::vector<float> v = crd::winograd::TransformWeights(w, g.Ci, g.Co, g.CoP);
  const int64_t nt = (g.Wo + 1) / 2, tiles_d = (g.Do + 1) / 2, tiles_h = (g.Ho + 1) / 2;
  const int64_t t_lo = std::min<int64_t>(1, nt);  // tile 0 reads column -1
  const int64_t t_hi = std::clamp<int64_t>(g.W >= 3 ? (g.W - 3) / 2 + 1 : 0, t_lo, nt);  // reads column 2t + 2
  const int64_t left_cols = 2 * t_lo + 2, right_cols = 2 * (nt - t_hi) + 2;
  const int64_t band = WinogradBand(g, g.W * g.Ci);
  ParallelFor(g.B * tiles_d, NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> edges(16 * (left_cols + right_cols) * g.Ci + 1);
    crd::winograd::Scratch scratch(g.Ci, g.Co);
    for (int64_t th0 = 0; th0 < tiles_h; th0 += band) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / tiles_d, td = p % tiles_d;
        for (int64_t th = th0; th < std::min(tiles_h, th0 + band); ++th) {
          crd::winograd::TileRows in;
          in.t_lo = t_lo, in.t_hi = t_hi;
          float* buf = edges.data();
          for (int64_t k = 0; k < 16; ++k) {
            const int64_t id = 2 * td - 1 + k / 4, ih = 2 * th - 1 + k % 4;
            if (id < 0 || id >= g.D || ih < 0 || ih >= g.H) {
              in.inner[k] = in.left[k] = in.right[k] = nullptr;
              continue;
            }
            const float* xrow = x + ((b * g.D + id) * g.H + ih) * g.W * g.Ci;
            in.inner[k] = xrow - g.Ci;  // tiles [t_lo, t_hi) never read before xrow
            in.left[k] = EdgeRow(g, xrow, 0, left_cols, buf);
            buf += left_cols * g.Ci;
            in.right[k] = EdgeRow(g, xrow, 2 * t_hi, right_cols, buf) + 2 * t_hi * g.Ci;
            buf += right_cols * g.Ci;
          }
          float* out[4];
          WinogradOutputRows(g, y, b, td, th, out);
          crd::winograd::TileRow(in, g.Ci, g.Co, nt, g.Wo, v.data(), bias, slope, act, out, scratch);
        }
      }
    }
  });
}

// The same over concat(up(low), skip): the zero-padded input rows of a band of tile rows are built once per
// plane into a ring of four depth slots (a tile plane reads four input planes, two shared with the next). Where
// the skip is exactly twice the coarse grid and the coarse channels fill whole vectors (VM's decoder), tile t
// of each axis sits on coarse voxel t: the upsampled channels are transformed from the coarse grid in place
// (InputTileUp: 27 of the 64 positions, the others zero) and the rows hold only the skip's channels.
void WinogradUpcatForward(const Geometry& g, const Upcat& u, const float* w, const float* bias, float slope, bool act,
                          float* y) {
  WinogradCalls().fetch_add(1, std::memory_order_relaxed);
  const std::vector<float> v = crd::winograd::TransformWeights(w, g.Ci, g.Co, g.CoP);
  const bool coarse = 2 * u.Dl == g.D && 2 * u.Hl == g.H && 2 * u.Wl == g.W && u.Cl % 16 == 0;
  const int64_t nt = (g.Wo + 1) / 2, tiles_d = (g.Do + 1) / 2, tiles_h = (g.Ho + 1) / 2;
  const int64_t width = 2 * nt + 2;  // virtual columns: input column c - 1
  const int64_t row_ci = coarse ? u.Cs : g.Ci;
  const int64_t row_floats = width * row_ci;
  const int64_t band = WinogradBand(g, row_floats);
  const int64_t plane_rows = 2 * band + 2;
  ParallelFor(g.B * tiles_d, NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> rows(4 * plane_rows * row_floats);
    int64_t plane_of_slot[4];
    crd::winograd::Scratch scratch(g.Ci, g.Co);
    for (int64_t th0 = 0; th0 < tiles_h; th0 += band) {
      std::fill(plane_of_slot, plane_of_slot + 4, -1);
      const int64_t th1 = std::min(tiles_h, th0 + band);
      const int64_t ih_first = 2 * th0 - 1;  // row 0 of every slot
      const int64_t ih_lo = std::max<int64_t>(0, ih_first), ih_hi = std::min(g.H, 2 * th1 + 1);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / tiles_d, td = p % tiles_d;
        for (int64_t a = 0; a < 4; ++a) {
          const int64_t id = 2 * td - 1 + a;
          if (id < 0 || id >= g.D || plane_of_slot[id % 4] == b * g.D + id) continue;
          for (int64_t ih = ih_lo; ih < ih_hi; ++ih) {
            float* dst = rows.data() + ((id % 4) * plane_rows + ih - ih_first) * row_floats;
            if (!coarse) {
              BuildUpcatRow(g, u, b, id, ih, width, g.Ci, dst);
              continue;
            }
            const float* skip_row = u.skip + ((b * g.D + id) * g.H + ih) * g.W * u.Cs;
            std::memset(dst, 0, row_floats * sizeof(float));
            for (int64_t iw = 0; iw < g.W; ++iw) CopyFloats(dst + (iw + 1) * u.Cs, skip_row + iw * u.Cs, u.Cs);
          }
          plane_of_slot[id % 4] = b * g.D + id;
        }
        for (int64_t th = th0; th < th1; ++th) {
          crd::winograd::TileRows in;
          in.t_lo = 0, in.t_hi = nt;
          for (int64_t k = 0; k < 16; ++k) {
            const int64_t id = 2 * td - 1 + k / 4, ih = 2 * th - 1 + k % 4;
            const bool inside = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
            in.inner[k] = inside ? rows.data() + ((id % 4) * plane_rows + ih - ih_first) * row_floats : nullptr;
            in.left[k] = in.right[k] = nullptr;
          }
          crd::winograd::UpRows up;
          if (coarse) {
            up.channels = u.Cl, up.columns = u.Wl;
            for (int64_t k = 0; k < 9; ++k) {
              const int64_t jd = td - 1 + k / 3, jh = th - 1 + k % 3;
              const bool inside = jd >= 0 && jd < u.Dl && jh >= 0 && jh < u.Hl;
              up.low[k] = inside ? u.low + ((b * u.Dl + jd) * u.Hl + jh) * u.Wl * u.Cl : nullptr;
            }
          }
          float* out[4];
          WinogradOutputRows(g, y, b, td, th, out);
          crd::winograd::TileRow(in, g.Ci, g.Co, nt, g.Wo, v.data(), bias, slope, act, out, scratch,
                                 coarse ? &up : nullptr);
        }
      }
    }
  });
}

// bf16: x and w hold pairs of bfloat16 input channels in each float (g.Ci counts the pairs); AVX-512 BF16 only.
void ConvForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                 float* y, bool bf16 = false) {
  if (WinogradApplies(g, bf16)) return WinogradForward(g, x, w, bias, slope, act, y);
  if (!bf16 && g.Co <= 4 && ActiveIsa() == kAvx512 && SmallCoAvx512(g, x, w, bias, slope, act, y)) return;
  if (!bf16 && g.sw == 1 && g.Co <= 4 && g.KD * (g.KH + 1) <= 64) {
    switch (g.Co) {
      case 1: return SmallCoForward<1>(g, x, w, bias, slope, act, y);
      case 2: return SmallCoForward<2>(g, x, w, bias, slope, act, y);
      case 3: return SmallCoForward<3>(g, x, w, bias, slope, act, y);
      case 4: return SmallCoForward<4>(g, x, w, bias, slope, act, y);
    }
  }
  const ColumnsFn columns = ColumnsFor(bf16);
  const bool fused_act = columns != Avx2Columns;  // the AVX-512 tiles apply the activation as they store
  const bool amx = columns == AmxBf16Columns;
  const ColumnRanges cr = Columns(g, amx ? kAmxEdgeColumns : kEdgeColumns);
  const int64_t planes = g.B * g.Do;
  const int64_t band = BandRows(g);
  ParallelFor(planes, NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> edges(g.KD * g.KH * (cr.left_width + cr.right_width) * g.Ci + 1, 0.0f);
    for (int64_t oh0 = 0; oh0 < g.Ho; oh0 += band)
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / g.Do, od = p % g.Do;
      for (int64_t oh = oh0; oh < std::min(g.Ho, oh0 + band); ++oh) {
        const RowSet real = InputRows(g, x, b, od, oh);
        RowSet inner, left, right;
        float* buf = edges.data();
        for (int i = 0; i < real.n; ++i) {
          const float* xrow = real.rows[i];
          const int64_t tap = real.taps[i];
          inner.rows[inner.n] = xrow - g.pw * g.Ci;  // virtual column 0; interior tiles never read before xrow
          inner.taps[inner.n++] = tap;
          if (cr.left_width > 0) {
            left.rows[left.n] = EdgeRow(g, xrow, 0, cr.left_width, buf);
            left.taps[left.n++] = tap;
            buf += cr.left_width * g.Ci;
          }
          if (cr.right_width > 0) {
            right.rows[right.n] = EdgeRow(g, xrow, cr.right_first, cr.right_width, buf);
            right.taps[right.n++] = tap;
            buf += cr.right_width * g.Ci;
          }
        }
        float* yrow = y + ((b * g.Do + od) * g.Ho + oh) * g.Wo * g.Co;
        columns(g, left, w, bias, 0, cr.interior_begin, slope, act, yrow);
        columns(g, inner, w, bias, cr.interior_begin, cr.interior_end, slope, act, yrow);
        columns(g, right, w, bias, cr.interior_end, g.Wo, slope, act, yrow);
        if (act && !fused_act) LeakyRow(yrow, g.Wo * g.Co, slope);
      }
    }
    if (amx) EndTiles();
  });
}

// bf16: the rows are rounded to bfloat16 pairs as they are built (g.Ci counts pairs) and the bf16 tiles run.
void ConvUpcatForward(const Geometry& g, const Upcat& u, const float* w, const float* bias, float slope, bool act,
                      float* y, bool bf16) {
  if (WinogradApplies(g, bf16)) return WinogradUpcatForward(g, u, w, bias, slope, act, y);
  const ColumnsFn columns = ColumnsFor(bf16);
  const bool fused_act = columns != Avx2Columns;
  const int64_t width = g.Wo + g.KW - 1;  // stride 1
  const int64_t band = BandRows(g);
  const int64_t plane_rows = band + g.KH - 1;
  const int64_t row_floats = width * g.Ci;
  ParallelFor(g.B * g.Do, NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> rows(g.KD * plane_rows * row_floats);
    std::vector<float> unpacked(bf16 ? 2 * row_floats : 0);
    std::vector<int64_t> plane_of_slot(g.KD);
    for (int64_t oh0 = 0; oh0 < g.Ho; oh0 += band) {
      std::fill(plane_of_slot.begin(), plane_of_slot.end(), -1);
      const int64_t ih_first = oh0 - g.ph;  // row 0 of every slot
      const int64_t ih_lo = std::max<int64_t>(0, ih_first);
      const int64_t ih_hi = std::min(g.H, ih_first + std::min(band, g.Ho - oh0) + g.KH - 1);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / g.Do, od = p % g.Do;
        for (int64_t kd = 0; kd < g.KD; ++kd) {  // the KD consecutive planes fall in distinct slots (id mod KD)
          const int64_t id = od - g.pd + kd;
          if (id < 0 || id >= g.D) continue;
          const int64_t slot = id % g.KD;
          if (plane_of_slot[slot] == b * g.D + id) continue;
          for (int64_t ih = ih_lo; ih < ih_hi; ++ih) {
            float* dst = rows.data() + (slot * plane_rows + ih - ih_first) * row_floats;
            if (bf16) {
              BuildUpcatRow(g, u, b, id, ih, width, 2 * g.Ci, unpacked.data());
              PackBf16Pairs(unpacked.data(), 2 * row_floats, dst);
            } else {
              BuildUpcatRow(g, u, b, id, ih, width, g.Ci, dst);
            }
          }
          plane_of_slot[slot] = b * g.D + id;
        }
        for (int64_t oh = oh0; oh < std::min(g.Ho, oh0 + band); ++oh) {
          const RowSet rs = InputRows(g, b, od, oh, [&](int64_t, int64_t id, int64_t ih) {
            return rows.data() + ((id % g.KD) * plane_rows + ih - ih_first) * row_floats;
          });
          float* yrow = y + (p * g.Ho + oh) * g.Wo * g.Co;
          columns(g, rs, w, bias, 0, g.Wo, slope, act, yrow);
          if (act && !fused_act) LeakyRow(yrow, g.Wo * g.Co, slope);
        }
      }
    }
    if (columns == AmxBf16Columns) EndTiles();
  });
}

// Weight-gradient micro-kernel: CI input channels x CB*8 output channels, summed over columns [ow_lo, ow_hi).
// kTail: the last 8-channel group of dy is partial and read with a mask (dy is not padded).
template <int CI, int CB, bool kTail>
inline void WgradTile(const Geometry& g, const float* xrow, const float* dyrow, int64_t kw, int64_t ci0,
                      int64_t co0, int64_t ow_lo, int64_t ow_hi, float* dw_tap) {
  __m256 acc[CI][CB];
  #pragma GCC unroll 16
  for (int i = 0; i < CI; ++i)
    #pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) acc[i][c] = _mm256_setzero_ps();
  const __m256i tail = TailMask(kTail ? static_cast<int>(g.Co - co0 - 8 * (CB - 1)) : 8);
  const int64_t Ci = g.Ci, Co = g.Co, xstep = g.sw * Ci;
  const float* dyp = dyrow + ow_lo * Co + co0;
  const float* xp = xrow + (ow_lo * g.sw - g.pw + kw) * Ci + ci0;
  for (int64_t ow = ow_lo; ow < ow_hi; ++ow, dyp += Co, xp += xstep) {
    __m256 dv[CB];
    #pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) {
      dv[c] = (kTail && c == CB - 1) ? _mm256_maskload_ps(dyp + 8 * c, tail) : _mm256_loadu_ps(dyp + 8 * c);
    }
    #pragma GCC unroll 16
    for (int i = 0; i < CI; ++i) {
      const __m256 xv = _mm256_broadcast_ss(xp + i);
      #pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) acc[i][c] = _mm256_fmadd_ps(xv, dv[c], acc[i][c]);
    }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < CI; ++i) {
    float* out = dw_tap + (ci0 + i) * g.CoP + co0;
    #pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_add_ps(_mm256_loadu_ps(out + 8 * c), acc[i][c]));
  }
}

template <int CB, bool kTail>
inline void WgradCiBlocks(const Geometry& g, const float* xrow, const float* dyrow, int64_t kw, int64_t co0,
                          int64_t ow_lo, int64_t ow_hi, float* dw_tap) {
  int64_t ci0 = 0;
  constexpr int kCi = CB == 2 ? 6 : 12;
  for (; ci0 + kCi <= g.Ci; ci0 += kCi) WgradTile<kCi, CB, kTail>(g, xrow, dyrow, kw, ci0, co0, ow_lo, ow_hi, dw_tap);
  for (; ci0 + 4 <= g.Ci; ci0 += 4) WgradTile<4, CB, kTail>(g, xrow, dyrow, kw, ci0, co0, ow_lo, ow_hi, dw_tap);
  for (; ci0 < g.Ci; ++ci0) WgradTile<1, CB, kTail>(g, xrow, dyrow, kw, ci0, co0, ow_lo, ow_hi, dw_tap);
}

void ConvWeightGrad(const Geometry& g, const float* x, const float* dy, float* dw_out) {
  const int64_t taps = g.KD * g.KH * g.KW;
  const int64_t wsize = taps * g.Ci * g.CoP;
  const int64_t rows = g.B * g.Do * g.Ho;
  const int threads = static_cast<int>(std::min<int64_t>(NumThreads(), rows));
  std::vector<std::vector<float>> partial(std::max(threads, 1), std::vector<float>(wsize, 0.0f));
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end, int t) {
    float* acc = partial[t].data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (g.Do * g.Ho), od = (r / g.Ho) % g.Do, oh = r % g.Ho;
      const float* dyrow = dy + r * g.Wo * g.Co;
      for (int64_t kd = 0; kd < g.KD; ++kd) {
        const int64_t id = od * g.sd - g.pd + kd;
        if (id < 0 || id >= g.D) continue;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = oh * g.sh - g.ph + kh;
          if (ih < 0 || ih >= g.H) continue;
          const float* xrow = x + ((b * g.D + id) * g.H + ih) * g.W * g.Ci;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            // Columns whose tap kw falls inside the input row.
            int64_t ow_lo = 0, ow_hi = g.Wo;
            while (ow_lo < g.Wo && ow_lo * g.sw - g.pw + kw < 0) ++ow_lo;
            while (ow_hi > ow_lo && (ow_hi - 1) * g.sw - g.pw + kw >= g.W) --ow_hi;
            if (ow_lo >= ow_hi) continue;
            float* dw_tap = acc + ((kd * g.KH + kh) * g.KW + kw) * g.Ci * g.CoP;
            int64_t co0 = 0;
            for (; co0 + 16 <= g.Co; co0 += 16) WgradCiBlocks<2, false>(g, xrow, dyrow, kw, co0, ow_lo, ow_hi, dw_tap);
            for (; co0 + 8 <= g.Co; co0 += 8) WgradCiBlocks<1, false>(g, xrow, dyrow, kw, co0, ow_lo, ow_hi, dw_tap);
            if (co0 < g.Co) WgradCiBlocks<1, true>(g, xrow, dyrow, kw, co0, ow_lo, ow_hi, dw_tap);
          }
        }
      }
    }
  });
  // Sum the per-thread partials and drop the output-channel padding.
  for (int64_t k = 0; k < taps * g.Ci; ++k) {
    for (int64_t co = 0; co < g.Co; ++co) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) s += partial[t][k * g.CoP + co];
      dw_out[k * g.Co + co] = s;
    }
  }
}

ffi::Error CheckRank(const ffi::AnyBuffer::Dimensions& d, size_t rank, const char* what) {
  if (d.size() != rank) return ffi::Error::InvalidArgument(std::string(what) + ": wrong rank");
  return ffi::Error::Success();
}

// A fresh output buffer is an untouched anonymous mapping; its first writes fault in 4 KB pages (~13k faults,
// ~20% of a full-resolution 16-channel layer). Asking for transparent huge pages on the 2 MB-aligned part
// before writing turns those into a few hundred faults. A hint only: ignored where THP is off.
bool HugePagesWanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("CRD_JAX_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}

void AdviseHugePages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge || !HugePagesWanted()) return;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sd, int64_t sh, int64_t sw, int64_t pd,
                       int64_t ph, int64_t pw, float slope, int64_t act, int64_t bf16) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank(xd, 5, "x"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "y"); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4], wd[4],
             wd[0], wd[1], wd[2], sd, sh, sw, pd, ph, pw};
  if (wd[3] != g.Ci || g.CoP % 8 != 0 || g.CoP < g.Co) return ffi::Error::InvalidArgument("weight shape");
  if (g.KD * g.KH > 64) return ffi::Error::InvalidArgument("kernel too large (KD * KH > 64)");
  if (bf16 != 0 && !CpuHasBf16()) return ffi::Error::InvalidArgument("bf16 convolution needs AVX512-BF16");
  AdviseHugePages(y->typed_data(), y->size_bytes());
  ConvForward(g, x.typed_data(), w.typed_data(), bias.typed_data(), slope, act != 0, y->typed_data(), bf16 != 0);
  return ffi::Error::Success();
}

ffi::Error ConvUpcatFwdImpl(ffi::Buffer<ffi::F32> low, ffi::Buffer<ffi::F32> skip, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t pd, int64_t ph,
                            int64_t pw, float slope, int64_t act, int64_t bf16) {
  auto ld = low.dimensions(), sd = skip.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank(ld, 5, "low"); e.failure()) return e;
  if (auto e = CheckRank(sd, 5, "skip"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "y"); e.failure()) return e;
  const int64_t ci = bf16 != 0 ? (ld[4] + sd[4] + 1) / 2 : ld[4] + sd[4];  // bf16: pairs of channels
  Geometry g{sd[0], sd[1], sd[2], sd[3], ci, yd[1], yd[2], yd[3], yd[4], wd[4],
             wd[0], wd[1], wd[2], 1, 1, 1, pd, ph, pw};
  const Upcat u{low.typed_data(), ld[1], ld[2], ld[3], ld[4], skip.typed_data(), sd[4]};
  if (ld[0] != sd[0] || sd[1] > 2 * ld[1] || sd[2] > 2 * ld[2] || sd[3] > 2 * ld[3])
    return ffi::Error::InvalidArgument("low and skip shapes do not match a x2 upsampling");
  if (g.Do != g.D - g.KD + 1 + 2 * pd || g.Ho != g.H - g.KH + 1 + 2 * ph || g.Wo != g.W - g.KW + 1 + 2 * pw)
    return ffi::Error::InvalidArgument("output shape");
  if (wd[3] != g.Ci || g.CoP % 8 != 0 || g.CoP < g.Co) return ffi::Error::InvalidArgument("weight shape");
  if (g.KD * g.KH > 64) return ffi::Error::InvalidArgument("kernel too large (KD * KH > 64)");
  if (bf16 != 0 && !CpuHasBf16()) return ffi::Error::InvalidArgument("bf16 convolution needs AVX512-BF16");
  AdviseHugePages(y->typed_data(), y->size_bytes());
  ConvUpcatForward(g, u, w.typed_data(), bias.typed_data(), slope, act != 0, y->typed_data(), bf16 != 0);
  return ffi::Error::Success();
}

ffi::Error ConvWgradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                         int64_t sd, int64_t sh, int64_t sw, int64_t pd, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (auto e = CheckRank(xd, 5, "x"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "dy"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "dw"); e.failure()) return e;
  const int64_t co = yd[4];
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], co, (co + 7) / 8 * 8,
             wd[0], wd[1], wd[2], sd, sh, sw, pd, ph, pw};
  if (wd[3] != g.Ci || wd[4] != co) return ffi::Error::InvalidArgument("weight-gradient shape");
  ConvWeightGrad(g, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sd")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvUpcatFwd, ConvUpcatFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvWgrad, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sd")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

extern "C" int crd_num_threads() { return NumThreads(); }

extern "C" int crd_isa() { return ActiveIsa(); }

// Selects the forward kernel's vector width (0: AVX2, 1: AVX-512); returns the width now in use (AVX-512 is
// refused where the CPU lacks it). For tests and benchmarks, which compare both paths in one process.
extern "C" int crd_set_isa(int isa) {
  IsaSetting().store(isa == kAvx512 && CpuHasAvx512() ? kAvx512 : kAvx2);
  return ActiveIsa();
}

// Turns the Winograd path of the stride-1 3^3 layers on (1) or off (0); returns the setting now in force.
extern "C" int crd_set_winograd(int on) {
  WinogradSetting().store(on != 0 ? 1 : 0);
  return WinogradSetting().load();
}

extern "C" int crd_winograd() { return WinogradSetting().load(); }

extern "C" int64_t crd_winograd_calls() { return WinogradCalls().load(); }

extern "C" int crd_has_bf16() { return CpuHasBf16(); }

// Multiply-adds per second of the bfloat16 engine in use over float32 FMAs on this CPU, measured on the calling
// thread (~20 ms); 0 without AVX512-BF16. VDPBF16PS: up to 2 where it issues as often as VFMADD, 0.50 measured
// on an Intel Sapphire Rapids-class Xeon; AMX: ~16 on the same Xeon.
extern "C" double crd_bf16_speedup() {
  if (!CpuHasBf16()) return 0.0;
  return ActiveBf16Engine() == kBf16Amx ? AmxMulAddSpeedup() : Bf16MulAddSpeedup();
}

extern "C" int crd_bf16_engine() { return ActiveBf16Engine(); }

// Selects the engine of the bf16 tiles (0: VDPBF16PS, 1: AMX); returns the one now in use (AMX is refused where
// the CPU or the kernel lacks it). For tests and benchmarks, which compare both in one process.
extern "C" int crd_set_bf16_engine(int engine) {
  Bf16EngineSetting().store(engine == kBf16Amx && CpuHasAmxBf16() ? kBf16Amx : kBf16Avx512);
  return ActiveBf16Engine();
}

extern "C" int crd_cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// What this library was built from (source, flags, jaxlib: crd_jax/ops/native_build.py); the loader uses an
// installed library only when this matches the running jaxlib and the source on disk.
#ifndef CRD_BUILD_KEY
#define CRD_BUILD_KEY ""
#endif
extern "C" const char* crd_build_key() { return CRD_BUILD_KEY; }
