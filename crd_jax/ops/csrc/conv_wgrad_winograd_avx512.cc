// The weight gradient of the stride-1 3^3 padding-1 layers in the Winograd domain, F(2x2x2, 3x3x3), AVX-512
// float32: 64 multiply-adds per 2x2x2 outputs and channel pair instead of 8 x 27 = 216 (the direct kernel,
// wgrad_blocked.h, already runs near the FMA peak, so fewer multiply-adds is what is left to gain).
//
// Derivation, one axis. The forward pass (winograd.h) computes each pair of outputs of a tile as
//   y_j = sum_p At[j][p] (G g)_p (Bt d)_p,    At = [[1, 1, 1, 0], [0, 1, -1, -1]]
// from the tile's four inputs d (input columns 2t - 1 .. 2t + 2, zero outside) and the taps g. The weight
// gradient is dL/dg_k = sum_tiles sum_j dy_j dy_j/dg_k, and since y is linear in g:
//   dL/dg_k = sum_p G[p][k] sum_tiles (A dy)_p (Bt d)_p,   i.e.  dg = G^T [ sum_tiles (A dy) * (Bt d) ]
// with A dy = (dy0, dy0 + dy1, dy0 - dy1, -dy1) (A = At^T) and
//   G^T m = (m0 + (m1 + m2) / 2, (m1 - m2) / 2, (m1 + m2) / 2 + m3).
// The sign of the fourth component is moved from the tiles into the once-per-layer back transform: the tiles
// use A' dy = (dy0, dy0 + dy1, dy0 - dy1, dy1) and the end uses G'^T m = (m0 + (m1 + m2) / 2, (m1 - m2) / 2,
// (m1 + m2) / 2 - m3). Outputs past the edge (sizes that are not multiples of 2) enter as dy = 0, inputs outside
// the volume as x = 0, so every tile is a whole one. In 3-D every transform is applied along the three axes, and
// per channel pair and position p = (a * 4 + b) * 4 + c:
//   M[p][ci][co] = sum_tiles U[p][tile][ci] V[p][tile][co],  U = Bt x_tile B (3-D), V = A' dy_tile (3-D),
//   dw[kd][kh][kw][ci][co] = G'^T M (3-D).
// (Checked in numpy against the direct correlation on 5x7x3, 9x4x6 and 1x2x1 volumes before this was written:
// max error 1.4e-14 in float64; tests/test_conv_wgrad_winograd.py checks this kernel against lax.)
//
// The tiles of a thread are transformed a chunk at a time (U[64][chunk][Ci], V[64][chunk][Co]: ~128 KB, in
// the L2 cache) and the 64 products of the chunk are added into the thread's M[64][.][.] (64 Ci Co floats),
// whose register blocks stay in registers over the chunk's tiles. The whole transformed tensors never exist.
// One operand of the products fills the vector lanes, the other is broadcast: the lanes go to whichever of Ci
// and Co wastes fewer of them (the flow head's 3 output channels broadcast, its 16 input channels fill lanes).
//
// Compiled with the AVX-512 flags (CMakeLists.txt); only called where WinogradWgradApplies (conv_wgrad_avx2.cc).
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "compile this file with the AVX-512 flags (CMakeLists.txt: CRD_AVX512_SOURCES)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512_common.h"
#include "conv_common.h"
#include "parallel.h"
#include "winograd.h"

namespace crd::winograd {
namespace {

constexpr int64_t kGradChunk = 32;  // tiles transformed before their products are accumulated
constexpr int64_t kFoldTiles = 512;  // tiles summed in float32 before they are added to the float64 total
constexpr int64_t kAhead = 4;       // tiles ahead whose input and gradient columns are prefetched

// Prefetches floats [first, first + n) of a row into the L1 cache.
inline void PrefetchFloats(const float* first, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) _mm_prefetch(reinterpret_cast<const char*>(first + k), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(first + n - 1), _MM_HINT_T0);
}

inline int64_t Pad16(int64_t n) { return (n + 15) / 16 * 16; }

// A' along one axis: two values in, four out.
inline void GradAxis(__m512 d0, __m512 d1, __m512* o) {
  o[0] = d0;
  o[1] = _mm512_add_ps(d0, d1);
  o[2] = _mm512_sub_ps(d0, d1);
  o[3] = d1;
}

// V[p][slot][co0 .. co0 + 16) of one tile from dy's 2 x 2 x 2 block: rows[r * 2 + s] is dy row (2 td + r, 2 th + s)
// (nullptr past the edge), `col` the tile's first output column; columns past wo and lanes past Co read zeros,
// so V's padding lanes are zero.
inline void GradTile(const float* const* rows, int64_t col, int64_t wo, int64_t co, int64_t co0, __mmask16 mask,
                     float* v, int64_t v_stride) {
  __m512 w[2][2][4];  // [r][s][c] after the width axis
  for (int r = 0; r < 2; ++r) {
    for (int s = 0; s < 2; ++s) {
      const float* row = rows[r * 2 + s];
      __m512 d[2];
      for (int c = 0; c < 2; ++c) {
        d[c] = row != nullptr && col + c < wo ? _mm512_maskz_loadu_ps(mask, row + (col + c) * co + co0)
                                              : _mm512_setzero_ps();
      }
      GradAxis(d[0], d[1], w[r][s]);
    }
  }
  __m512 h[2][4][4];  // [r][b][c] after the height axis
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 4; ++c) {
      __m512 o[4];
      GradAxis(w[r][0][c], w[r][1][c], o);
      for (int b = 0; b < 4; ++b) h[r][b][c] = o[b];
    }
  }
  for (int b = 0; b < 4; ++b) {
    for (int c = 0; c < 4; ++c) {
      __m512 o[4];
      GradAxis(h[0][b][c], h[1][b][c], o);
      for (int a = 0; a < 4; ++a) _mm512_storeu_ps(v + ((a * 4 + b) * 4 + c) * v_stride + co0, o[a]);
    }
  }
}

// m[r][16 j] += sum_t bc[t * bs + r] vec[t * vs + 16 j] for R broadcast rows and CV vectors, over n tiles (summed
// in registers from zero, then added: a sum over a few dozen tiles, not one chain over the thread's ~10^5).
template <int R, int CV>
inline void GradGemm(int64_t n, const float* bc, int64_t bs, const float* vec, int64_t vs, float* m, int64_t ms) {
  __m512 acc[R][CV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < CV; ++j) acc[r][j] = _mm512_setzero_ps();  // the chunk's own sum, then added to m
  for (int64_t t = 0; t < n; ++t, bc += bs, vec += vs) {
    __m512 w[CV];
#pragma GCC unroll 2
    for (int j = 0; j < CV; ++j) w[j] = _mm512_loadu_ps(vec + 16 * j);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(bc[r]);
#pragma GCC unroll 2
      for (int j = 0; j < CV; ++j) acc[r][j] = _mm512_fmadd_ps(x, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < CV; ++j) {
      float* out = m + r * ms + 16 * j;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[r][j]));
    }
}

// GradGemm over `rows` broadcast rows: blocks of the most rows CV vectors leave registers for, then the rest.
template <int CV>
inline void GradGemmRows(int64_t rows, int64_t n, const float* bc, int64_t bs, const float* vec, int64_t vs, float* m,
                         int64_t ms) {
  constexpr int kMax = CV == 1 ? 16 : 12;
  int64_t r0 = 0;
  for (; r0 + kMax <= rows; r0 += kMax) GradGemm<kMax, CV>(n, bc + r0, bs, vec, vs, m + r0 * ms, ms);
  switch (rows - r0) {
#define CRD_WGRAD_CASE(R) \
  case R:                 \
    return GradGemm<R, CV>(n, bc + r0, bs, vec, vs, m + r0 * ms, ms);
    CRD_WGRAD_CASE(1) CRD_WGRAD_CASE(2) CRD_WGRAD_CASE(3) CRD_WGRAD_CASE(4) CRD_WGRAD_CASE(5) CRD_WGRAD_CASE(6)
    CRD_WGRAD_CASE(7) CRD_WGRAD_CASE(8) CRD_WGRAD_CASE(9) CRD_WGRAD_CASE(10) CRD_WGRAD_CASE(11)
    CRD_WGRAD_CASE(12) CRD_WGRAD_CASE(13) CRD_WGRAD_CASE(14) CRD_WGRAD_CASE(15)
#undef CRD_WGRAD_CASE
    default:
      return;
  }
}

// The shapes of one layer's buffers. The broadcast operand has nb channels, the vector operand nv (padded to
// nv_pad lanes); M[p] is nb rows of nv_pad floats.
struct Plan {
  bool lanes_co;  // the vector lanes hold output channels (U broadcast), else input channels (V broadcast)
  int64_t ci_pad, co_pad, nb, nv_pad;
  int64_t u_stride, v_stride, m_stride;  // floats between two positions p of U, V, M
};

Plan MakePlan(const Geometry& g) {
  Plan p;
  // Vector multiply-adds per tile and position: broadcast rows x vectors.
  p.lanes_co = g.Ci * Pad16(g.Co) <= g.Co * Pad16(g.Ci);
  p.ci_pad = Pad16(g.Ci), p.co_pad = Pad16(g.Co);
  p.nb = p.lanes_co ? g.Ci : g.Co;
  p.nv_pad = p.lanes_co ? p.co_pad : p.ci_pad;
  p.u_stride = kGradChunk * p.ci_pad + kSkew;
  p.v_stride = kGradChunk * p.co_pad + kSkew;
  p.m_stride = p.nb * p.nv_pad;
  return p;
}

// Adds the products of the n tiles in U and V to M. The first `up` input channels (a multiple of 16) are upsampled
// ones (InputTileUp): at the 37 positions with an index 2 their U is zero, so their rows (or lanes) are skipped and
// their M stays zero.
void ChunkGrad(const Plan& pl, int64_t n, const float* u, const float* v, float* m, int64_t up) {
  const float* bc = pl.lanes_co ? u : v;
  const float* vec = pl.lanes_co ? v : u;
  const int64_t b_stride = pl.lanes_co ? pl.u_stride : pl.v_stride, v_stride = pl.lanes_co ? pl.v_stride : pl.u_stride;
  const int64_t bs = pl.lanes_co ? pl.ci_pad : pl.co_pad, vs = pl.nv_pad;
  for (int p = 0; p < 64; ++p) {
    const int64_t skip = up > 0 && HasIndexTwo(p) ? up : 0;
    const int64_t row0 = pl.lanes_co ? skip : 0, lane0 = pl.lanes_co ? 0 : skip;  // what the zero channels occupy
    const float* bp = bc + p * b_stride + row0;
    const float* vp = vec + p * v_stride;
    float* mp = m + p * pl.m_stride + row0 * pl.nv_pad;
    int64_t j0 = lane0;
    for (; j0 + 32 <= pl.nv_pad; j0 += 32) GradGemmRows<2>(pl.nb - row0, n, bp, bs, vp + j0, vs, mp + j0, pl.nv_pad);
    if (j0 < pl.nv_pad) GradGemmRows<1>(pl.nb - row0, n, bp, bs, vp + j0, vs, mp + j0, pl.nv_pad);
  }
}

// G'^T along one axis (the derivation above): four values in, three out.
inline void BackAxis(const double* m, int64_t s, double* g, int64_t gs) {
  const double half_sum = 0.5 * (m[s] + m[2 * s]);
  g[0] = m[0] + half_sum;
  g[gs] = 0.5 * (m[s] - m[2 * s]);
  g[2 * gs] = half_sum - m[3 * s];
}

// A thread's float64 sums, in a type of this file: std::vector<double>'s methods compiled here would carry AVX-512
// instructions under a name the baseline files share, and the linker may keep this copy for all of them
// (tests/test_native_build.py checks that no such function exists).
class Float64Sums {
 public:
  Float64Sums() = default;
  Float64Sums(const Float64Sums&) = delete;
  Float64Sums& operator=(const Float64Sums&) = delete;
  ~Float64Sums() { delete[] data_; }
  void Zero(int64_t n) {
    delete[] data_;
    data_ = new double[n]();
  }
  double* data() { return data_; }
  const double* data() const { return data_; }

 private:
  double* data_ = nullptr;
};

}  // namespace

void WinogradWeightGrad(const Geometry& g, const float* x, const float* dy, float* dw_out) {
  WinogradWeightGradUpcat(g, nullptr, 0, x, dy, dw_out);
}

// With `low` (cl > 0): the layer's input is concat(up(low), x), a U-Net decoder step (conv_upcat.cc): the first cl
// input channels (a multiple of 16) are the nearest x2 upsampling of low (B, D / 2, H / 2, W / 2, cl), D, H, W even,
// and x holds the other g.Ci - cl channels. Tile t of every axis then sits on coarse voxel t, the upsampled channels'
// input transform is InputTileUp's (27 of 64 positions nonzero) and their products at the other 37 are skipped: 27
// instead of the stride-2 coarse correlation's 64 multiply-adds per coarse voxel and channel pair, and the gradient
// transform of dy is shared with the skip channels'. The concatenation is never stored.
void WinogradWeightGradUpcat(const Geometry& g, const float* low, int64_t cl, const float* x, const float* dy,
                             float* dw_out) {
  WinogradWgradCalls().fetch_add(1, std::memory_order_relaxed);
  const Plan pl = MakePlan(g);
  const int64_t cs = g.Ci - cl;  // channels per voxel of x
  const int64_t ld = g.D / 2, lh = g.H / 2, lw = g.W / 2;  // low's grid (with cl > 0)
  const int64_t nt = (g.W + 1) / 2, tiles_d = (g.D + 1) / 2, tiles_h = (g.H + 1) / 2;
  // Threads take planes of tiles (two output depths), in bands of tile rows: the 4 input planes x (2 band + 2)
  // rows of a band stay in the L2 cache while the next tile plane reads two of its planes again (as the forward
  // pass's bands; tile row by tile row through a whole plane, every input row came from memory twice).
  const int64_t planes = g.B * tiles_d;
  const int64_t row_bytes = std::max<int64_t>(1, g.W * cs) * static_cast<int64_t>(sizeof(float));
  const int64_t band = std::clamp<int64_t>((kBandBytes / (4 * row_bytes) - 2) / 2, 1, tiles_h);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(NumThreads(), planes)));
  std::vector<Float64Sums> partial(threads);
  ParallelFor(planes, threads, [&](int64_t begin, int64_t end, int th) {
    // Rounding: M is float32 over at least kFoldTiles tiles (whole planes of a band; chunk sums added), then
    // added into the thread's float64 sum; one float32 chain over a thread's 10^5 tiles at 128^3 grew the error ~10x
    // past the direct kernel's (6e-6 of the largest entry at 64^3, against 7e-7).
    partial[th].Zero(64 * pl.m_stride);
    double* total = partial[th].data();
    std::vector<float> m(64 * pl.m_stride, 0.0f);
    int64_t unfolded = 0;  // tiles added to m since the last fold
    auto fold = [&] {
      for (size_t k = 0; k < m.size(); ++k) total[k] += m[k], m[k] = 0.0f;
      unfolded = 0;
    };
    // Zeroed once: masked stores never write the padding lanes, which must stay zero.
    std::vector<float> u(64 * pl.u_stride, 0.0f), v(64 * pl.v_stride, 0.0f), edge(16 * 4 * cs + 16, 0.0f);
    int64_t slot = 0;
    for (int64_t th0 = 0; th0 < tiles_h; th0 += band)
    for (int64_t plane = begin; plane < end; ++plane, unfolded >= kFoldTiles ? fold() : void())
    for (int64_t th2 = th0; th2 < std::min(tiles_h, th0 + band); ++th2) {
      const int64_t b = plane / tiles_d, td = plane % tiles_d;
      const float* xrows[16];  // input rows (2 td - 1 + a, 2 th - 1 + b), their virtual column 0 at column -1
      const float* xin[16];    // the same rows at column 0 (nullptr outside)
      for (int k = 0; k < 16; ++k) {
        const int64_t id = 2 * td - 1 + k / 4, ih = 2 * th2 - 1 + k % 4;
        const bool inside = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
        xin[k] = inside && cs > 0 ? x + ((b * g.D + id) * g.H + ih) * g.W * cs : nullptr;
        xrows[k] = xin[k] != nullptr ? xin[k] - cs : nullptr;
      }
      const float* lrows[9];  // low's rows (td - 1 + jd, th - 1 + jh): the coarse neighbourhood of the tile row
      for (int k = 0; k < 9 && cl > 0; ++k) {
        const int64_t jd = td - 1 + k / 3, jh = th2 - 1 + k % 3;
        lrows[k] = jd >= 0 && jd < ld && jh >= 0 && jh < lh ? low + ((b * ld + jd) * lh + jh) * lw * cl : nullptr;
      }
      const float* dyrows[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t od = 2 * td + k / 2, oh = 2 * th2 + k % 2;
        dyrows[k] = od < g.Do && oh < g.Ho ? dy + ((b * g.Do + od) * g.Ho + oh) * g.Wo * g.Co : nullptr;
      }
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t c0 = 2 * t - 1;  // the tile's first input column
        // 16 input rows and 4 gradient rows stream at once, more than the hardware prefetcher follows: the two
        // new columns of the tile kAhead tiles on are fetched now (measured: the input transform waited on them).
        if (const int64_t next = 2 * (t + kAhead); next + 2 < g.W) {  // its input columns next + 1, next + 2
          for (int k = 0; k < 16; ++k)
            if (xin[k] != nullptr) PrefetchFloats(xin[k] + (next + 1) * cs, 2 * cs);
          for (int k = 0; k < 4; ++k)  // its output columns next, next + 1
            if (dyrows[k] != nullptr) PrefetchFloats(dyrows[k] + next * g.Co, 2 * g.Co);
        }
        const float* rows[16];
        int64_t offset = 2 * t * cs;
        if (c0 >= 0 && c0 + 4 <= g.W) {
          std::copy(xrows, xrows + 16, rows);
        } else {  // a tile at either end of the row: its four columns copied, zero outside the row
          offset = 0;
          for (int k = 0; k < 16; ++k) {
            float* dst = edge.data() + k * 4 * cs;
            rows[k] = xin[k] != nullptr ? dst : nullptr;
            if (xin[k] == nullptr) continue;
            for (int64_t c = 0; c < 4; ++c) {
              const int64_t col = c0 + c;
              if (col >= 0 && col < g.W) {
                std::memcpy(dst + c * cs, xin[k] + col * cs, cs * sizeof(float));
              } else {
                std::memset(dst + c * cs, 0, cs * sizeof(float));
              }
            }
          }
        }
        float* ut = u.data() + slot * pl.ci_pad;
        for (int64_t ci0 = 0; ci0 < cl; ci0 += 16) InputTileUp(lrows, t, t > 0, t + 1 < lw, cl, ci0, ut, pl.u_stride);
        for (int64_t ci0 = 0; ci0 < cs; ci0 += 16)
          InputTile(rows, offset, cs, ci0, LaneMask(cs - ci0), ut + cl, pl.u_stride);
        for (int64_t co0 = 0; co0 < g.Co; co0 += 16)
          GradTile(dyrows, 2 * t, g.Wo, g.Co, co0, LaneMask(g.Co - co0), v.data() + slot * pl.co_pad, pl.v_stride);
        if (++slot == kGradChunk) {
          ChunkGrad(pl, slot, u.data(), v.data(), m.data(), cl);
          unfolded += slot, slot = 0;
        }
      }
    }
    if (slot > 0) ChunkGrad(pl, slot, u.data(), v.data(), m.data(), cl);
    fold();
  });
  // Sum the threads' M (in double: a few additions per weight), then G'^T along the three axes.
  const int64_t ci = g.Ci, co = g.Co;
  for (int64_t i = 0; i < ci; ++i) {
    for (int64_t o = 0; o < co; ++o) {
      const int64_t at = pl.lanes_co ? i * pl.nv_pad + o : o * pl.nv_pad + i;
      double m[64], t1[3 * 16], t2[3 * 3 * 4], t3[27];
      for (int p = 0; p < 64; ++p) {
        double s = 0.0;
        for (const Float64Sums& part : partial)
          if (part.data() != nullptr) s += part.data()[p * pl.m_stride + at];
        m[p] = s;
      }
      for (int bc = 0; bc < 16; ++bc) BackAxis(m + bc, 16, t1 + bc, 16);  // depth: m[a][bc] -> t1[kd][bc]
      for (int kd = 0; kd < 3; ++kd)
        for (int c = 0; c < 4; ++c) BackAxis(t1 + kd * 16 + c, 4, t2 + kd * 12 + c, 4);  // height -> t2[kd][kh][c]
      for (int k = 0; k < 9; ++k) BackAxis(t2 + k * 4, 1, t3 + k * 3, 1);  // width -> t3[kd][kh][kw]
      for (int tap = 0; tap < 27; ++tap) dw_out[(tap * ci + i) * co + o] = static_cast<float>(t3[tap]);
    }
  }
}

}  // namespace crd::winograd
