// Winograd F(2x2x2, 3x3x3) for the stride-1 3^3 layers, plain and fused with the decoder's upsampling and
// concatenation: the drivers over rows of tiles; the transforms and the products are in winograd.h.
//
// Compiled with the AVX-512 flags (CMakeLists.txt); only called where WinogradApplies (conv_direct.cc).
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"
#include "parallel.h"
#include "winograd.h"

namespace crd::winograd {

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
// few columns they need. row(in, b, td, th, scratch) does the work of tile row (b, td, th) on its inputs.
template <typename RowFn>
void ForEachTileRow(const Geometry& g, const float* x, RowFn row) {
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
          row(in, b, td, th, scratch);
        }
      }
    }
  });
}

void WinogradForward(const Geometry& g, const float* x, const float* w, const float* bias, float slope, bool act,
                     float* y) {
  WinogradCalls().fetch_add(1, std::memory_order_relaxed);
  const std::vector<float> v = crd::winograd::TransformWeights(w, g.Ci, g.Co, g.CoP);
  const int64_t nt = (g.Wo + 1) / 2;
  ForEachTileRow(g, x, [&](const crd::winograd::TileRows& in, int64_t b, int64_t td, int64_t th,
                           crd::winograd::Scratch& scratch) {
    float* out[4];
    WinogradOutputRows(g, y, b, td, th, out);
    crd::winograd::TileRow(in, g.Ci, g.Co, nt, g.Wo, v.data(), bias, slope, act, out, scratch);
  });
}

// WinogradForward with the 2 x 2 x 2 outputs of every tile summed into one voxel of a grid half the size (the
// caller checks that the output's sizes are even): the input gradient of a convolution of a nearest-upsampled
// input, pool(conv^T(dy)), in 27 instead of 64 products per tile (winograd.h: TileRowPooled).
void WinogradPooledForward(const Geometry& g, const float* x, const float* w, float* y) {
  WinogradCalls().fetch_add(1, std::memory_order_relaxed);
  const std::vector<float> v = crd::winograd::TransformWeights(w, g.Ci, g.Co, g.CoP);
  const int64_t nt = (g.Wo + 1) / 2, tiles_d = (g.Do + 1) / 2, tiles_h = (g.Ho + 1) / 2;
  ForEachTileRow(g, x, [&](const crd::winograd::TileRows& in, int64_t b, int64_t td, int64_t th,
                           crd::winograd::Scratch& scratch) {
    float* out = y + ((b * tiles_d + td) * tiles_h + th) * nt * g.Co;  // coarse row (b, td, th)
    crd::winograd::TileRowPooled(in, g.Ci, g.Co, nt, v.data(), out, scratch);
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

}  // namespace crd::winograd
