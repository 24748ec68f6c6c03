// The forward pass's driver: output rows in bands that keep their input rows in the L2 cache, the columns at
// either end of a row on small zero-padded copies, and the choice of kernel for a call: Winograd
// (conv_winograd_avx512.cc), the few-output-channel kernels, else the column tiles of the active instruction set
// (conv_direct_avx2.cc, conv_direct_avx512.cc, conv_amx.cc). Compiled with the baseline flags.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"
#include "parallel.h"
#include "winograd.h"

namespace crd {

namespace {
// The edges are at least `edge` columns wide, so that they run in tiles as efficient as the interior's: 8 for
// the vector tiles, 16 (one tile's rows) for AMX.
constexpr int64_t kEdgeColumns = 8;
constexpr int64_t kAmxEdgeColumns = 16;
}  // namespace

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

// The column kernel of a forward pass: bf16 tiles (AMX, else AVX512-BF16), else the active vector width's.
ColumnsFn ColumnsFor(bool bf16) {
  if (bf16) return ActiveBf16Engine() == kBf16Amx ? amx::AmxBf16Columns : avx512::Avx512Bf16Columns;
  return ActiveIsa() == kAvx512 ? avx512::Avx512Columns : avx2::Avx2Columns;
}

// Winograd F(2x2x2, 3x3x3) where it applies (dispatch.cc: WinogradSetting) and pays: enough input channels
// (dispatch.cc: WinogradMinInputChannels).
bool WinogradApplies(const Geometry& g, bool bf16) {
  return !bf16 && WinogradSetting().load(std::memory_order_relaxed) != 0 && ActiveIsa() == kAvx512 &&
         g.KD == 3 && g.KH == 3 && g.KW == 3 && g.sd == 1 && g.sh == 1 && g.sw == 1 && g.pd == 1 && g.ph == 1 &&
         g.pw == 1 && g.Do == g.D && g.Ho == g.H && g.Wo == g.W && g.Co % 16 == 0 && g.CoP == g.Co &&
         g.Ci >= WinogradMinInputChannels().load(std::memory_order_relaxed) && g.Ci <= crd::winograd::kMaxChannels;
}

// bf16: x and w hold pairs of bfloat16 input channels in each float (g.Ci counts the pairs); AVX-512 BF16 only.
void ConvForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                 float* y, bool bf16) {
  if (WinogradApplies(g, bf16)) return winograd::WinogradForward(g, x, w, bias, slope, act, y);
  if (!bf16 && g.Co <= 4 && ActiveIsa() == kAvx512 && avx512::SmallCoAvx512(g, x, w, bias, slope, act, y)) return;
  if (!bf16 && g.sw == 1 && g.Co <= 4 && g.KD * (g.KH + 1) <= 64) {
    return avx2::SmallCoForward(g, x, w, bias, slope, act, y);
  }
  const ColumnsFn columns = ColumnsFor(bf16);
  const bool fused_act = columns != avx2::Avx2Columns;  // the AVX-512 tiles apply the activation as they store
  const bool amx = columns == amx::AmxBf16Columns;
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
        if (act && !fused_act) avx2::LeakyRow(yrow, g.Wo * g.Co, slope);
      }
    }
    if (amx) amx::EndTiles();
  });
}

}  // namespace crd
