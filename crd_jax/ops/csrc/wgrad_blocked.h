// The blocked weight gradient, written once for any vector width: conv_wgrad_avx2.cc instantiates it with 8-lane
// AVX2 registers, conv_wgrad_avx512.cc with 16-lane AVX-512 ones (each file passes a trait struct V with its
// intrinsics, so this header holds no instruction of its own and each instantiation carries its file's flags).
//
// dw[kd, kh, kw, ci, co] = sum_{b, od, oh, ow} x[b, id, ih, ow * sw - pw + kw, ci] * dy[b, od, oh, ow, co].
// For one output row and one (kd, kh) tap this is a small matrix product over the row's columns:
//   G[m, co] += sum_ow X[ow, m] dy[ow, co],  m = kw * Ci + ci,  X[ow, m] = xrow[(ow * sw - pw) * Ci + m],
// and X's row ow is CONTIGUOUS in m (the KW taps of a channels-last row sit side by side), whatever the stride.
// So every kw tap is folded into one vector dimension of KW * Ci lanes, and the kernel picks, per layer, which
// operand fills the vector lanes:
//   * "vector over m" (VecM): vectors of X, each dy value broadcast once and used by all KW * Ci lanes (and by up
//     to three taps' rows: a small C_out, like the flow head's 3, fills the registers with taps instead);
//   * "vector over co" (VecCo): vectors of dy, X broadcast: for a few input channels (KW * Ci = 6 for an image
//     pair), where m would leave most lanes empty.
// Accumulators stay in registers over a whole row segment (tens to hundreds of columns) and are added to a
// per-thread partial sum, so the partials' traffic is a fraction of a percent of the multiply-adds.
//
// The few columns at either end of a row whose taps reach past the input row read a zero-padded copy of the
// columns they need (as the forward pass's edge rows), so the tiles never test bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "conv_common.h"
#include "parallel.h"

namespace crd {
namespace {

constexpr int kWgradMaxTaps = 3;  // rows (taps) one tile may cover, sharing its dy values

// A run of columns: `n` columns of one output row from the column its pointers point at, for up to three taps.
// (Templates on the vector trait, as everything here, so that each file's copies, std::vector's included, are
// named after its trait: tests/test_native_build.py looks for AVX-512 code by name.)
template <class V>
struct WgradRun {
  const float* xs[kWgradMaxTaps];  // X[o0, 0] of each tap's row (stride xstep per column)
  const float* dy;                 // dy[o0, 0] (stride Co per column)
  int64_t n;
};

// One tile call: a list of runs (the rows of a band: accumulators stay in registers across them), one block of
// the vector dimension and one of the broadcast dimension.
template <class V>
struct WgradTileArgs {
  const WgradRun<V>* runs;
  int64_t nruns;
  int64_t m0, c0;  // the block's first m and co
  int64_t xstep;
  int64_t Co;
  int64_t last_valid;  // valid lanes of the block's last vector (lanes past M or Co are masked off)
  float* out[kWgradMaxTaps];  // each tap's partial sums at the block's origin
  int64_t ostride;  // floats between two rows of the partial (one broadcast value to the next)
};

// VecM: acc[t][v][c] (lanes: m) += X_t[k, m0 + v*L + lane] * dy[k, c0 + c].
template <class V, int T, int MV, int NC>
void WgradTileVecM(const WgradTileArgs<V>& a) {
  constexpr int L = V::kLanes;
  typename V::Reg acc[T][MV][NC];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[t][v][c] = V::Zero();
  const typename V::Mask last = V::MaskOf(a.last_valid);
  const int64_t xstep = a.xstep, co = a.Co;
  for (int64_t r = 0; r < a.nruns; ++r) {
  const WgradRun<V>& run = a.runs[r];
  const float* dyp = run.dy + a.c0;
  const float* xrow[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) xrow[t] = run.xs[t] + a.m0;
  for (int64_t k = 0; k < run.n; ++k, dyp += co) {
    typename V::Reg d[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) d[c] = V::Broadcast(dyp + c);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const float* xp = xrow[t] + k * xstep;
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) {
        typename V::Reg xv = v == MV - 1 ? V::LoadMasked(xp + v * L, last) : V::Load(xp + v * L);
        // One load per vector: left alone, GCC folds the load into each of the NC multiply-adds (18 extra loads
        // a column for 3 taps x 3 vectors x 3 broadcasts), which doubled the cost where x is not 64-byte aligned
        // (each 512-bit load then spans two cache lines). Measured 1.3-1.45x on unaligned rows, 1.0-1.07x aligned.
        asm("" : "+v"(xv));
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[t][v][c] = V::MulAdd(xv, d[c], acc[t][v][c]);
      }
    }
  }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) V::AddTo(a.out[t] + c * a.ostride + v * L, acc[t][v][c]);
}

// VecCo: acc[t][m][v] (lanes: co) += X_t[k, m0 + m] * dy[k, c0 + v*L + lane].
template <class V, int T, int MB, int CV>
void WgradTileVecCo(const WgradTileArgs<V>& a) {
  constexpr int L = V::kLanes;
  typename V::Reg acc[T][MB][CV];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < CV; ++v) acc[t][m][v] = V::Zero();
  const typename V::Mask last = V::MaskOf(a.last_valid);
  const int64_t xstep = a.xstep, co = a.Co;
  for (int64_t r = 0; r < a.nruns; ++r) {
  const WgradRun<V>& run = a.runs[r];
  const float* dyp = run.dy + a.c0;
  const float* xrow[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) xrow[t] = run.xs[t] + a.m0;
  for (int64_t k = 0; k < run.n; ++k, dyp += co) {
    typename V::Reg d[CV];
#pragma GCC unroll 8
    for (int v = 0; v < CV; ++v) d[v] = v == CV - 1 ? V::LoadMasked(dyp + v * L, last) : V::Load(dyp + v * L);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const float* xp = xrow[t] + k * xstep;
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const typename V::Reg xb = V::Broadcast(xp + m);
#pragma GCC unroll 8
        for (int v = 0; v < CV; ++v) acc[t][m][v] = V::MulAdd(xb, d[v], acc[t][m][v]);
      }
    }
  }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < CV; ++v) V::AddTo(a.out[t] + m * a.ostride + v * L, acc[t][m][v]);
}

// Register budget of a tile: accumulators + broadcast values kept + one loaded vector must fit the register file.
template <class V>
constexpr bool WgradFitsVecM(int t, int mv, int nc) {
  return t * mv * nc + nc + 1 <= V::kRegisters;
}
template <class V>
constexpr bool WgradFitsVecCo(int t, int mb, int cv) {
  return t * mb * cv + cv + 1 <= V::kRegisters;
}

constexpr int kWgradMaxVec = 4;    // vectors per tile along the vector dimension
constexpr int kWgradMaxBcast = 8;  // broadcast values per tile (VecM)
constexpr int kWgradMaxBcastCo = 12;  // broadcast values per tile (VecCo)

// Runs the tile instantiated for (T, vectors, broadcasts); the chooser only asks for shapes that fit.
template <class V, int T, int NV = 1, int NB = 1>
void WgradRunVecM(int nv, int nb, const WgradTileArgs<V>& a) {
  if constexpr (WgradFitsVecM<V>(T, NV, NB)) {
    if (nv == NV && nb == NB) return WgradTileVecM<V, T, NV, NB>(a);
  }
  if constexpr (NB < kWgradMaxBcast) {
    WgradRunVecM<V, T, NV, NB + 1>(nv, nb, a);
  } else if constexpr (NV < kWgradMaxVec) {
    WgradRunVecM<V, T, NV + 1, 1>(nv, nb, a);
  }
}

template <class V, int T, int NV = 1, int NB = 1>
void WgradRunVecCo(int nv, int nb, const WgradTileArgs<V>& a) {
  if constexpr (WgradFitsVecCo<V>(T, NB, NV)) {
    if (nv == NV && nb == NB) return WgradTileVecCo<V, T, NB, NV>(a);
  }
  if constexpr (NB < kWgradMaxBcastCo) {
    WgradRunVecCo<V, T, NV, NB + 1>(nv, nb, a);
  } else if constexpr (NV < kWgradMaxVec) {
    WgradRunVecCo<V, T, NV + 1, 1>(nv, nb, a);
  }
}

// The blocking of a layer: which operand is vectorised, how many vectors, broadcast values and taps per tile.
struct WgradPlan {
  bool vec_m;
  int taps;    // 1 or 3 rows per tile
  int vecs;    // vectors per tile (blocks of the vector dimension; the last block may have fewer)
  int bcast;   // broadcast values per tile (the last block may have fewer)
  int64_t vdim, bdim;  // sizes of the vector dimension (M or Co) and of the broadcast one
};

// Cycles per column of one tile under a simple model of a Zen 4 / Skylake-class core: V::kFmaPerCycle full-width
// multiply-adds and two loads per cycle; each accumulator's chain waits for its previous multiply-add (latency 4),
// so a tile needs several accumulators to keep the pipes busy; and a broadcast takes V::kBroadcastFma of a
// multiply-add's issue slot (measured on Zen 4 with AVX-512: 16 -> 16 channels ran ~20% faster as vectors of
// x with 4 broadcasts per 24 multiply-adds than as vectors of dy with 24).
template <class V>
double WgradTileCycles(int t, int nv, int nb, bool vec_m) {
  constexpr double kLatency = 4.0, kLoadsPerCycle = 2.0, kLoopCycles = 0.5;
  const double fmas = static_cast<double>(t * nv * nb);
  // VecM loads t*nv vectors and nb broadcasts per column; VecCo nv vectors and t*nb broadcasts
  const double bcasts = vec_m ? nb : t * nb;
  const double loads = (vec_m ? t * nv : nv) + bcasts;
  const double issue = (fmas + V::kBroadcastFma * bcasts) / V::kFmaPerCycle;
  return std::max({issue, loads / kLoadsPerCycle, kLatency}) + kLoopCycles;
}

// Cycles per useful multiply-add (masked lanes are waste) of a plan over a whole row: its full blocks and the
// smaller last block of each dimension.
template <class V>
double WgradCost(int64_t vdim, int64_t bdim, int t, int nv, int nb, bool vec_m) {
  const int64_t L = V::kLanes;
  const int64_t vecs = (vdim + L - 1) / L;
  const int64_t v_full = vecs / nv, v_last = vecs % nv, b_full = bdim / nb, b_last = bdim % nb;
  double cycles = 0.0;
  for (int i = 0; i < 2; ++i) {
    const int64_t vcount = i == 0 ? v_full : (v_last > 0 ? 1 : 0);
    const int vsize = i == 0 ? nv : static_cast<int>(v_last);
    for (int j = 0; j < 2; ++j) {
      const int64_t bcount = j == 0 ? b_full : (b_last > 0 ? 1 : 0);
      const int bsize = j == 0 ? nb : static_cast<int>(b_last);
      if (vcount > 0 && bcount > 0) cycles += vcount * bcount * WgradTileCycles<V>(t, vsize, bsize, vec_m);
    }
  }
  return cycles / (static_cast<double>(vdim * bdim * t) / L);
}

template <class V>
WgradPlan ChooseWgradPlan(const Geometry& g) {
  const int64_t M = g.KW * g.Ci;
  WgradPlan best{true, 1, 1, 1, M, g.Co};
  double best_cost = 1e30;
  for (int vec_m = 1; vec_m >= 0; --vec_m) {
    const int64_t vdim = vec_m ? M : g.Co, bdim = vec_m ? g.Co : M;
    const int max_b = vec_m ? kWgradMaxBcast : kWgradMaxBcastCo;
    for (int t : {1, 3}) {
      if (t > g.KD * g.KH) continue;
      for (int nv = 1; nv <= kWgradMaxVec; ++nv) {
        if ((nv - 1) * V::kLanes >= vdim) break;
        for (int nb = 1; nb <= max_b && nb <= bdim; ++nb) {
          const bool fits = vec_m ? WgradFitsVecM<V>(t, nv, nb) : WgradFitsVecCo<V>(t, nb, nv);
          if (!fits) continue;
          const double cost = WgradCost<V>(vdim, bdim, t, nv, nb, vec_m);
          if (cost < best_cost - 1e-9) {
            best_cost = cost;
            best = WgradPlan{vec_m == 1, t, nv, nb, vdim, bdim};
          }
        }
      }
    }
  }
  return best;
}

// The columns of an output row whose taps all lie inside the input row: [lo, hi) (lo == hi: none). (A template,
// as everything here, so that each file's copy is named after its trait.)
template <class V>
void WgradInterior(const Geometry& g, int64_t* lo, int64_t* hi) {
  int64_t l = (g.pw + g.sw - 1) / g.sw;  // first ow with ow * sw - pw >= 0
  int64_t h = g.W - g.KW + g.pw >= 0 ? (g.W - g.KW + g.pw) / g.sw + 1 : 0;  // last ow with ow*sw - pw + KW <= W
  l = std::min(l, g.Wo);
  h = std::clamp(h, l, g.Wo);
  *lo = l;
  *hi = h;
}

// Runs the plan's tiles over a list of runs of `taps` rows (1 or 3) whose partials are outs[0..taps).
template <class V>
void WgradRuns(const WgradPlan& p, const Geometry& g, const WgradRun<V>* runs, int64_t nruns, int taps,
               float* const* outs, int64_t vstride_out) {
  if (nruns == 0) return;
  const int64_t L = V::kLanes;
  const int64_t vblock = p.vecs * L;
  WgradTileArgs<V> a;
  a.runs = runs;
  a.nruns = nruns;
  a.xstep = g.sw * g.Ci;
  a.Co = g.Co;
  a.ostride = vstride_out;
  for (int64_t v0 = 0; v0 < p.vdim; v0 += vblock) {
    const int nv = static_cast<int>(std::min<int64_t>(p.vecs, (p.vdim - v0 + L - 1) / L));
    a.last_valid = std::min<int64_t>(L, p.vdim - v0 - (nv - 1) * L);
    for (int64_t b0 = 0; b0 < p.bdim; b0 += p.bcast) {
      const int nb = static_cast<int>(std::min<int64_t>(p.bcast, p.bdim - b0));
      // VecM: vectors over m (x), broadcasts over co (dy); partial [co][m]. VecCo: the reverse; partial [m][co].
      a.m0 = p.vec_m ? v0 : b0;
      a.c0 = p.vec_m ? b0 : v0;
      for (int t = 0; t < taps; ++t) a.out[t] = outs[t] + b0 * vstride_out + v0;
      if (p.vec_m) {
        if (taps == 3) WgradRunVecM<V, 3>(nv, nb, a); else WgradRunVecM<V, 1>(nv, nb, a);
      } else {
        if (taps == 3) WgradRunVecCo<V, 3>(nv, nb, a); else WgradRunVecCo<V, 1>(nv, nb, a);
      }
    }
  }
}

// The whole weight gradient: output rows split over the threads, each adding into its own partial sums (per
// (kd, kh) tap: bdim rows of the vector dimension rounded up to whole vectors), summed at the end. A thread takes
// its rows in bands of about 256 columns; a tile runs over a band's rows before adding its accumulators to the
// partial (a 16-column row alone would spend as long on that as on its multiply-adds).
template <class V>
void WeightGradBlocked(const Geometry& g, const float* x, const float* dy, float* dw_out) {
  const int64_t L = V::kLanes;
  const WgradPlan p = ChooseWgradPlan<V>(g);
  const int64_t M = g.KW * g.Ci;
  const int64_t vpad = (p.vdim + L - 1) / L * L;  // a partial row: the vector dimension, whole vectors
  const int64_t tap_size = p.bdim * vpad;
  const int64_t taps2 = g.KD * g.KH;
  const int64_t rows = g.B * g.Do * g.Ho;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(NumThreads(), rows)));
  const int64_t band = std::clamp<int64_t>(256 / std::max<int64_t>(g.Wo, 1), 1, 32);
  int64_t lo, hi;
  WgradInterior<V>(g, &lo, &hi);
  // Edge runs [0, lo) and [hi, Wo) read zero-padded copies of their columns: (n - 1) * sw + KW columns.
  const int64_t edge_cols = std::max<int64_t>(std::max<int64_t>(lo, g.Wo - hi) - 1, 0) * g.sw + g.KW;
  const int64_t edge_row = edge_cols * g.Ci;
  std::vector<std::vector<float>> partial(threads, std::vector<float>(taps2 * tap_size, 0.0f));
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end, int th) {
    float* part = partial[th].data();
    // a band never longer than the thread's rows; the edge copies are written before they are read, so their
    // scratch is not zeroed (for a small layer, zeroing room for 32 rows of every tap is work out of proportion)
    const int64_t rows_per_band = std::min(band, end - begin);
    std::unique_ptr<float[]> edge(new float[std::max<int64_t>(rows_per_band * taps2 * 2 * edge_row, 1)]);
    const int64_t groups = p.taps == 3 ? taps2 / 3 : 0;  // taps 3j..3j+2 share a tile; the rest run alone
    std::vector<std::vector<WgradRun<V>>> by_group(groups), by_tap(taps2);  // a band's runs
    std::vector<const float*> rowp(taps2);
    std::vector<char> valid(taps2);
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_band) {
      const int64_t r1 = std::min(end, r0 + rows_per_band);
      for (auto& runs : by_group) runs.clear();
      for (auto& runs : by_tap) runs.clear();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (g.Do * g.Ho), od = (r / g.Ho) % g.Do, oh = r % g.Ho;
        const float* dyrow = dy + r * g.Wo * g.Co;
        for (int64_t kd = 0; kd < g.KD; ++kd) {
          const int64_t id = od * g.sd - g.pd + kd;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.sh - g.ph + kh, tap = kd * g.KH + kh;
            valid[tap] = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
            rowp[tap] = valid[tap] ? x + ((b * g.D + id) * g.H + ih) * g.W * g.Ci : nullptr;
          }
        }
        // x pointers of each segment (interior in place, edges from zero-padded copies) for tap `tap`
        float* edge_base = edge.get() + (r - r0) * taps2 * 2 * edge_row;
        auto seg_x = [&](int64_t tap, int side) -> const float* {
          if (side == 2) return rowp[tap] + (lo * g.sw - g.pw) * g.Ci;
          const int64_t o0 = side == 0 ? 0 : hi, o1 = side == 0 ? lo : g.Wo;
          const int64_t first = o0 * g.sw - g.pw, cols = (o1 - o0 - 1) * g.sw + g.KW;
          float* e = edge_base + (tap * 2 + side) * edge_row;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t ix = first + c;
            if (ix >= 0 && ix < g.W) {
              std::memcpy(e + c * g.Ci, rowp[tap] + ix * g.Ci, g.Ci * sizeof(float));
            } else {
              std::memset(e + c * g.Ci, 0, g.Ci * sizeof(float));
            }
          }
          return e;
        };
        const int64_t seg_o0[3] = {0, hi, lo}, seg_n[3] = {lo, g.Wo - hi, hi - lo};
        for (int side = 0; side < 3; ++side) {
          if (seg_n[side] <= 0) continue;
          const float* dyp = dyrow + seg_o0[side] * g.Co;
          for (int64_t tap = 0; tap < taps2; ++tap) {
            if (!valid[tap]) continue;
            const int64_t grp = tap / 3;
            const bool in_group = grp < groups && valid[3 * grp] && valid[3 * grp + 1] && valid[3 * grp + 2];
            if (!in_group) {
              by_tap[tap].push_back(WgradRun<V>{{seg_x(tap, side), nullptr, nullptr}, dyp, seg_n[side]});
            } else if (tap % 3 == 0) {
              by_group[grp].push_back(WgradRun<V>{{seg_x(tap, side), seg_x(tap + 1, side), seg_x(tap + 2, side)}, dyp,
                                               seg_n[side]});
            }
          }
        }
      }
      for (int64_t grp = 0; grp < groups; ++grp) {
        float* outs[3] = {part + 3 * grp * tap_size, part + (3 * grp + 1) * tap_size, part + (3 * grp + 2) * tap_size};
        WgradRuns<V>(p, g, by_group[grp].data(), static_cast<int64_t>(by_group[grp].size()), 3, outs, vpad);
      }
      for (int64_t tap = 0; tap < taps2; ++tap) {
        float* outs[1] = {part + tap * tap_size};
        WgradRuns<V>(p, g, by_tap[tap].data(), static_cast<int64_t>(by_tap[tap].size()), 1, outs, vpad);
      }
    }
  });
  // dw[tap][m][co] = sum over threads; VecM partials are [tap][co][m], VecCo partials [tap][m][co].
  for (int64_t tap = 0; tap < taps2; ++tap) {
    for (int64_t m = 0; m < M; ++m) {
      float* dst = dw_out + (tap * M + m) * g.Co;
      for (int64_t co = 0; co < g.Co; ++co) {
        const int64_t at = tap * tap_size + (p.vec_m ? co * vpad + m : m * vpad + co);
        float s = 0.0f;
        for (int th = 0; th < threads; ++th) s += partial[th][at];
        dst[co] = s;
      }
    }
  }
}

}  // namespace
}  // namespace crd
