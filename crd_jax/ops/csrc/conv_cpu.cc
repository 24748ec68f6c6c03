// Direct 3-D convolution for x86-64 CPUs with AVX2 + FMA, exposed to XLA as FFI custom calls.
//
// Why this exists: XLA's CPU backend runs 3^3 convolutions at ~15 GFLOP/s on the 2-core machines this
// project targets, and an im2col + dot formulation is bounded by the memory traffic of the 27x patch
// matrix. A register-blocked direct convolution reads each input voxel from cache and keeps the partial
// sums in registers, which is what oneDNN does for PyTorch.
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

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t B, D, H, W, Ci;
  int64_t Do, Ho, Wo, Co, CoP;
  int64_t KD, KH, KW;
  int64_t sd, sh, sw;
  int64_t pd, ph, pw;
};

// CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers), so that
// the kernel does not oversubscribe a machine that hardware_concurrency() describes but does not grant.
int AllowedCpus() {
  int n = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r")) {
    char quota[32] = {0};
    long long period = 0;
    if (std::fscanf(f, "%31s %lld", quota, &period) == 2 && std::strcmp(quota, "max") != 0 && period > 0) {
      long long q = std::atoll(quota);
      int cap = static_cast<int>((q + period - 1) / period);
      if (cap > 0) n = std::min(n, cap);
    }
    std::fclose(f);
  }
  return std::max(n, 1);
}

int NumThreads() {
  static int n = [] {
    if (const char* env = std::getenv("CRD_JAX_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    return AllowedCpus();
  }();
  return n;
}

// One persistent pool for the process (threads are started once, not on every call). Run(k, fn) runs
// fn(0..k-1), fn(0) on the caller, and returns when all are done; one parallel region at a time.
class Pool {
 public:
  explicit Pool(int size) {
    for (int t = 1; t < size; ++t) std::thread([this, t] { Loop(t); }).detach();
  }

  void Run(int threads, const std::function<void(int)>& fn) {
    if (threads <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> region(region_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      active_ = threads;
      pending_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (t >= active_) continue;
        fn = fn_;
      }
      (*fn)(t);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex region_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

Pool& ThePool() {
  static Pool* pool = new Pool(NumThreads());  // never destroyed: its threads live as long as the process
  return *pool;
}

// Runs fn(begin, end, thread_index) over [0, n) split into contiguous chunks, one per thread.
template <typename Fn>
void ParallelFor(int64_t n, int max_threads, Fn fn) {
  int threads = static_cast<int>(std::min<int64_t>(std::min(max_threads, NumThreads()), n));
  if (threads <= 1) {
    fn(0, n, 0);
    return;
  }
  ThePool().Run(threads, [&](int t) {
    int64_t begin = n * t / threads, end = n * (t + 1) / threads;
    fn(begin, end, t);
  });
}

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

// Columns [begin, end) in tiles of TW, the remainder in tiles of TW / 2, TW / 4, ... 1.
template <int CB, int TW>
void FwdColumns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                int64_t end, int64_t co0, float* yrow) {
  int64_t ow = begin;
  for (; ow + TW <= end; ow += TW) FwdTile<CB, TW>(g, rs, w, bias, ow, co0, yrow);
  if constexpr (TW > 1) {
    if (ow < end) FwdColumns<CB, TW / 2>(g, rs, w, bias, ow, end, co0, yrow);
  }
}

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

void ConvForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                 float* y) {
  if (g.sw == 1 && g.Co <= 4 && g.KD * (g.KH + 1) <= 64) {
    switch (g.Co) {
      case 1: return SmallCoForward<1>(g, x, w, bias, slope, act, y);
      case 2: return SmallCoForward<2>(g, x, w, bias, slope, act, y);
      case 3: return SmallCoForward<3>(g, x, w, bias, slope, act, y);
      case 4: return SmallCoForward<4>(g, x, w, bias, slope, act, y);
    }
  }
  const int64_t planes = g.B * g.Do;
  // Padded row length: every tap of every output column, and the whole input row, fit.
  const int64_t wp = std::max((g.Wo - 1) * g.sw + g.KW, g.pw + g.W);
  const int64_t row_floats = wp * g.Ci;
  const int64_t row_bytes = g.W * g.Ci * static_cast<int64_t>(sizeof(float));
  ParallelFor(planes, NumThreads(), [&](int64_t begin, int64_t end, int) {
    // Zero once; only the interior of each slot is ever overwritten, so the padding stays zero.
    std::vector<float> scratch(g.KD * g.KH * row_floats, 0.0f);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / g.Do, od = p % g.Do;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        RowSet rs;
        for (int64_t kd = 0; kd < g.KD; ++kd) {
          const int64_t id = od * g.sd - g.pd + kd;
          if (id < 0 || id >= g.D) continue;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.sh - g.ph + kh;
            if (ih < 0 || ih >= g.H) continue;
            const int64_t tap = kd * g.KH + kh;
            float* slot = scratch.data() + tap * row_floats;
            std::memcpy(slot + g.pw * g.Ci, x + ((b * g.D + id) * g.H + ih) * g.W * g.Ci, row_bytes);
            rs.rows[rs.n] = slot;
            rs.taps[rs.n] = tap;
            ++rs.n;
          }
        }
        float* yrow = y + ((b * g.Do + od) * g.Ho + oh) * g.Wo * g.Co;
        int64_t co0 = 0;
        for (; co0 + 16 <= g.CoP; co0 += 16) FwdColumns<2, 6>(g, rs, w, bias, 0, g.Wo, co0, yrow);
        for (; co0 < g.CoP; co0 += 8) FwdColumns<1, 12>(g, rs, w, bias, 0, g.Wo, co0, yrow);
        if (act) LeakyRow(yrow, g.Wo * g.Co, slope);
      }
    }
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

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sd, int64_t sh, int64_t sw, int64_t pd,
                       int64_t ph, int64_t pw, float slope, int64_t act) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank(xd, 5, "x"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "y"); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4], wd[4],
             wd[0], wd[1], wd[2], sd, sh, sw, pd, ph, pw};
  if (wd[3] != g.Ci || g.CoP % 8 != 0 || g.CoP < g.Co) return ffi::Error::InvalidArgument("weight shape");
  if (g.KD * g.KH > 64) return ffi::Error::InvalidArgument("kernel too large (KD * KH > 64)");
  ConvForward(g, x.typed_data(), w.typed_data(), bias.typed_data(), slope, act != 0, y->typed_data());
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
                                  .Attr<int64_t>("act"));

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

extern "C" int crd_cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
