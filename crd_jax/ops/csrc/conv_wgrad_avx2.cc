// The weight gradient of a convolution: dw[k, ci, co] = sum_{b, o} x[b, o * s - p + k, ci] * dy[b, o, co], per-thread
// partial sums added at the end. (The input gradient of a stride-1 convolution is the forward pass on dy with
// flipped, transposed weights: crd_jax/ops/conv.py.)
//
// Two kernels: the blocked one (wgrad_blocked.h; here with 8-lane AVX2 registers, in conv_wgrad_avx512.cc with
// AVX-512 ones), the default; and the "rows" kernel below, the earlier one (output channels in vectors of 8, one
// kw tap at a time), kept selectable (CRD_JAX_WGRAD=rows, crd_set_wgrad) so that tests and benchmarks compare
// the two in one process.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_common.h"
#include "parallel.h"
#include "wgrad_blocked.h"

namespace crd {
namespace {

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

struct Vec256 {
  using Reg = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;
  static constexpr double kFmaPerCycle = 2.0;
  static constexpr double kBroadcastFma = 0.0;  // see WgradTileCycles
  static Reg Zero() { return _mm256_setzero_ps(); }
  static Mask MaskOf(int64_t valid) { return TailMask(static_cast<int>(std::clamp<int64_t>(valid, 0, 8))); }
  static Reg Load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg LoadMasked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static Reg Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg MulAdd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void AddTo(float* p, Reg v) { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v)); }
};

void ConvWeightGradRows(const Geometry& g, const float* x, const float* dy, float* dw_out) {
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

}  // namespace

// The Winograd weight gradient's layers: AVX-512, 3^3 taps, stride 1, padding 1, output the input's size (so the
// high side pads by 1 too), and channels within what one thread's M (64 Ci Co floats) keeps in the L2 cache.
bool WinogradWgradApplies(const Geometry& g) {
  // (an empty tensor has no tiles: the blocked kernel writes its zero gradient)
  return ActiveIsa() == kAvx512 && g.KD == 3 && g.KH == 3 && g.KW == 3 && g.sd == 1 && g.sh == 1 && g.sw == 1 &&
         g.pd == 1 && g.ph == 1 && g.pw == 1 && g.Do == g.D && g.Ho == g.H && g.Wo == g.W && g.Ci <= 64 &&
         g.Co <= 64 && g.B >= 1 && g.D >= 1 && g.H >= 1 && g.W >= 1 && g.Ci >= 1 && g.Co >= 1;
}

namespace {

// Where "auto" takes the Winograd weight gradient (conv_wgrad_winograd_avx512.cc): measured per CPU-second
// against the blocked kernel (benchmarks/conv_backward.py --compare blocked winograd; docs/native-kernel.md). Its
// transforms cost per tile what ~16 channel pairs of products do, so few channels on either side lose (the flow
// head's 16 -> 3: 0.6-0.7x of the blocked kernel; the decoder's last skip, 2 -> 16: 0.85x), and so does a small
// volume, whose per-call costs (buffers, the back transform) outweigh its few tiles (8^3, 32 -> 32: 0.8x; 4^3:
// 0.4x). 16 -> 16 and 32 -> 32 from 16^3 up: 1.4-2.1x. A thin volume loses too: along an axis of 1 or 2 voxels
// the direct kernel skips the taps that fall outside, while a 2x2x2 tile pays its 64 products whatever its padding
// (1 x 128 x 128, 16 -> 16: 2.5-3.7x slower); and the kernel shares out planes of tiles (B x ceil(D / 2)), so with
// fewer planes than threads some threads would sit idle.
bool WinogradWgradWins(const Geometry& g) {
  return WinogradWgradApplies(g) && g.Ci >= 8 && g.Co >= 8 && g.D * g.H * g.W >= 16 * 16 * 16 &&
         std::min({g.D, g.H, g.W}) >= 4 && g.B * ((g.D + 1) / 2) >= NumThreads();
}

}  // namespace

void ConvWeightGrad(const Geometry& g, const float* x, const float* dy, float* dw_out) {
  const int setting = WgradSetting().load(std::memory_order_relaxed);
  if (setting == kWgradRows) {
    ConvWeightGradRows(g, x, dy, dw_out);
  } else if ((setting == kWgradWinograd && WinogradWgradApplies(g)) ||
             (setting == kWgradAuto && WinogradWgradWins(g))) {
    winograd::WinogradWeightGrad(g, x, dy, dw_out);
  } else if (ActiveIsa() == kAvx512) {
    avx512::WeightGradAvx512(g, x, dy, dw_out);
  } else if (g.Co < 8 || g.Ci <= 2) {
    // At 8 lanes the blocked kernel wins only where the rows kernel wastes lanes (the flow head's 3 output
    // channels: 2.7x at 64^3; the image pair's 2 input channels); on wide layers (16 -> 16, 32 -> 32) it measured
    // 0.6-0.8x of the rows kernel on Zen 4 forced to AVX2 (one process, alternated), so they keep that one.
    WeightGradBlocked<Vec256>(g, x, dy, dw_out);
  } else {
    ConvWeightGradRows(g, x, dy, dw_out);
  }
}

}  // namespace crd
