// What every convolution file shares: the geometry of a call, the input rows of an output row, the column
// tiling, and the declarations of the functions each file provides (conv_*.cc). The layout and the entry
// points are described in ffi_glue.cc; the files and their flags in CMakeLists.txt.
//
// Helpers defined here are in an anonymous namespace: each file gets its own copy, compiled with that file's
// instruction-set flags (a shared inline copy could be taken from an AVX-512 file and run on an AVX2-only CPU).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace crd {

struct Geometry {
  int64_t B, D, H, W, Ci;
  int64_t Do, Ho, Wo, Co, CoP;
  int64_t KD, KH, KW;
  int64_t sd, sh, sw;
  int64_t pd, ph, pw;
};

// Which vector width the forward kernel uses: AVX-512 where the CPU has it, unless CRD_JAX_ISA=avx2 (or

// Which vector width the forward kernel uses: AVX-512 where the CPU has it, unless CRD_JAX_ISA=avx2 (or
// crd_set_isa) asks for the AVX2 path, which every supported CPU runs.
enum Isa { kAvx2 = 0, kAvx512 = 1 };

// Which engine runs the bf16 tiles: AMX where the CPU and the kernel allow it, unless CRD_JAX_BF16_ENGINE=avx512
// (or crd_set_bf16_engine) asks for the VDPBF16PS tiles, which every AVX512-BF16 CPU runs.
enum Bf16Engine { kBf16Avx512 = 0, kBf16Amx = 1 };

// Which weight-gradient kernel runs (CRD_JAX_WGRAD or crd_set_wgrad): "auto", the default, takes the Winograd one
// (conv_wgrad_winograd_avx512.cc) on the layers where it applies and measured faster, the blocked one
// (wgrad_blocked.h, at the width ActiveIsa() selects) elsewhere; "winograd" takes it wherever it applies;
// "blocked" never; "rows" is the earlier AVX2 kernel (conv_wgrad_avx2.cc), kept for comparisons.
enum WgradKernel { kWgradRows = 0, kWgradBlocked = 1, kWgradWinograd = 2, kWgradAuto = 3 };

constexpr int64_t kBandBytes = 768 * 1024;  // input rows a band of output rows may keep in the L2 cache

// The input rows one output row reads, each copied into a W-padded scratch row so that every output
// column sees all KW taps (out-of-volume columns read the zero padding). rows[i] belongs to the
// (kd, kh) tap taps[i]; taps whose row lies outside the volume are simply absent.
struct RowSet {
  const float* rows[64];
  int64_t taps[64];
  int n = 0;
};


// Output columns whose every tap lies inside the input row: they read the input in place. The few columns at
// either end read a small zero-padded copy of the columns they need (the "edge" row sets).
struct ColumnRanges {
  int64_t interior_begin, interior_end;  // [L, R)
  int64_t left_width, right_first, right_width;  // virtual padded columns copied for the edges
};

// conv(concat(up(low), skip)): see conv_upcat.cc.
struct Upcat {
  const float* low;  // (B, Dl, Hl, Wl, Cl), the coarse features, repeated x2 along each axis and cropped
  int64_t Dl, Hl, Wl, Cl;
  const float* skip;  // (B, D, H, W, Cs); the concatenation is [up(low), skip] along channels
  int64_t Cs;
};

// The column kernel of a row: output columns [begin, end) of one output row over every tap of the row set.
using ColumnsFn = void (*)(const Geometry&, const RowSet&, const float*, const float*, int64_t, int64_t, float, bool,
                           float*);

// --- dispatch.cc: what this CPU has, and which paths the process chose (environment, control API) ----------
bool CpuHasAvx512();
bool CpuHasBf16();
bool CpuHasAmxBf16();
std::atomic<int>& IsaSetting();
int ActiveIsa();
std::atomic<int>& Bf16EngineSetting();
int ActiveBf16Engine();
std::atomic<int>& WinogradSetting();
std::atomic<int>& WinogradMinInputChannels();
std::atomic<int>& WgradSetting();
std::atomic<int64_t>& WinogradCalls();
std::atomic<int64_t>& WinogradWgradCalls();
bool HugePagesWanted();

// --- conv_direct.cc: the forward pass's driver (bands of rows, edge columns, the choice of kernel) ----------
ColumnRanges Columns(const Geometry& g, int64_t edge);
const float* EdgeRow(const Geometry& g, const float* xrow, int64_t first, int64_t width, float* buf);
ColumnsFn ColumnsFor(bool bf16);
bool WinogradApplies(const Geometry& g, bool bf16);
void ConvForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                 float* y, bool bf16 = false);

// --- conv_upcat.cc ---------------------------------------------------------------------------------------------
void BuildUpcatRow(const Geometry& g, const Upcat& u, int64_t b, int64_t id, int64_t ih, int64_t width, int64_t ci,
                   float* dst);
void ConvUpcatForward(const Geometry& g, const Upcat& u, const float* w, const float* bias, float slope, bool act,
                      float* y, bool bf16);

// --- conv_wgrad_avx2.cc (the choice of kernel, the AVX2 ones), conv_wgrad_avx512.cc ---------------------------
void ConvWeightGrad(const Geometry& g, const float* x, const float* dy, float* dw_out);
bool WinogradWgradApplies(const Geometry& g);

namespace avx2 {  // conv_direct_avx2.cc
void Avx2Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin, int64_t end,
                 float, bool, float* yrow);
void LeakyRow(float* y, int64_t n, float slope);
// C_out <= 4, stride 1 along W, KD * (KH + 1) <= 64.
void SmallCoForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                    float* y);
}  // namespace avx2

namespace avx512 {  // conv_direct_avx512.cc, bf16_rate_avx512.cc
void Avx512Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                   int64_t end, float slope, bool act, float* yrow);
void Avx512Bf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                       int64_t end, float slope, bool act, float* yrow);
bool SmallCoAvx512(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                   float* y);
void PackBf16Pairs(const float* src, int64_t n, float* dst);
double Bf16MulAddSpeedup();
double TimedFmaChains(int64_t iters);
void WeightGradAvx512(const Geometry& g, const float* x, const float* dy, float* dw_out);  // conv_wgrad_avx512.cc
}  // namespace avx512

namespace amx {  // conv_amx.cc
bool Compiled();  // false where the compiler lacked the AMX intrinsics (CRD_AMX=0)
void AmxBf16Columns(const Geometry& g, const RowSet& rs, const float* w, const float* bias, int64_t begin,
                    int64_t end, float slope, bool act, float* yrow);
void EndTiles();
double AmxMulAddSpeedup();
}  // namespace amx

namespace winograd {  // conv_winograd_avx512.cc
void WinogradForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                     float* y);
void WinogradPooledForward(const Geometry& g, const float* x, const float* w, float* y);
void WinogradUpcatForward(const Geometry& g, const Upcat& u, const float* w, const float* bias, float slope, bool act,
                          float* y);
void WinogradWeightGrad(const Geometry& g, const float* x, const float* dy, float* dw_out);  // conv_wgrad_winograd_avx512.cc
void WinogradWeightGradUpcat(const Geometry& g, const float* low, int64_t cl, const float* x, const float* dy,
                             float* dw_out);  // the same file: concat(up(low), x) as the input
}  // namespace winograd

namespace {

inline __m256i TailMask(int valid) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - valid));
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

}  // namespace
}  // namespace crd
