// The bf16 tiles on AMX (Intel Sapphire Rapids and later): tile-register matrix products.
//
// TDPBF16PS multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into 16 x 16 float32 sums: on a Sapphire
// Rapids-class Xeon ~16x the multiply-adds per second of AVX-512 FMAs, where VDPBF16PS runs at half the FMA
// rate. The bf16 layout of the kernel is already the one AMX reads: a row of A is one output column's input
// channels (pairs of bfloat16, consecutive columns sw * Ci words apart, read in place), a row of B one pair of
// input channels for 16 output channels (the packed weights, CoP words apart). Same values as the VDPBF16PS
// tiles up to the order of the float32 sums.
//
// Linux hands out the tile registers only after the process asks (arch_prctl ARCH_REQ_XCOMP_PERM); each
// thread configures its tiles (LDTILECFG) at the start of a row and releases them at the end, so that threads
// that never run a tile keep the small register state on context switches.

//
// Compiled with the AVX-512 and AMX flags (CMakeLists.txt; without the AMX flags and with CRD_AMX=0 where the
// compiler lacks them); only called when the CPU and Linux grant AMX (dispatch.cc: CpuHasAmxBf16).
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

#include "avx512_common.h"
#include "conv_common.h"

// The AMX intrinsics need GCC 11 or clang 12; older compilers (or -DCRD_AMX=0) build everything else.
#ifndef CRD_AMX
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define CRD_AMX 1
#else
#define CRD_AMX 0
#endif
#endif

namespace crd::amx {

bool Compiled() { return CRD_AMX != 0; }

#if CRD_AMX

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
  if (end - begin < 16) return avx512::Avx512Bf16Columns(g, rs, w, bias, begin, end, slope, act, yrow);
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
    fp32 = std::min(fp32, avx512::TimedFmaChains(1 << 19) / (1 << 19) / (24.0 * 16));
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

#else
void AmxBf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                    int64_t end, float slope, bool act, float* yrow) {
  avx512::Avx512Bf16Columns(g, rs, w, bias, begin, end, slope, act, yrow);
}
void EndTiles() {}
double AmxMulAddSpeedup() { return 0.0; }
#endif  // CRD_AMX

}  // namespace crd::amx
