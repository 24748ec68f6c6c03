// The fused decoder step, conv(concat(up(low), skip)), without materialising the concatenation.
//
// A U-Net decoder upsamples its coarse features x2 (nearest neighbour, cropped to the skip's size) and
// concatenates them with the skip connection before a stride-1 convolution. Materialised by XLA, that input
// is the largest tensor of the network (34 channels at full resolution for VM): written once, page-faulted
// in and read back. Here each thread builds the concatenated, zero-padded input rows of its band of output
// rows into an L2-sized buffer (each depth plane's rows once per band, KD planes in a ring) and runs the
// ordinary tiles on them; every column is then an interior column.
//
// Compiled with the baseline flags; the tiles come from ColumnsFor (conv_direct.cc), the stride-1 3^3 layers
// on AVX-512 from conv_winograd_avx512.cc.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"
#include "parallel.h"

namespace crd {

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

// bf16: the rows are rounded to bfloat16 pairs as they are built (g.Ci counts pairs) and the bf16 tiles run.
void ConvUpcatForward(const Geometry& g, const Upcat& u, const float* w, const float* bias, float slope, bool act,
                      float* y, bool bf16) {
  if (WinogradApplies(g, bf16)) return winograd::WinogradUpcatForward(g, u, w, bias, slope, act, y);
  const ColumnsFn columns = ColumnsFor(bf16);
  const bool fused_act = columns != avx2::Avx2Columns;
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
              avx512::PackBf16Pairs(unpacked.data(), 2 * row_floats, dst);
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
          if (act && !fused_act) avx2::LeakyRow(yrow, g.Wo * g.Co, slope);
        }
      }
    }
    if (columns == amx::AmxBf16Columns) amx::EndTiles();
  });
}

}  // namespace crd
