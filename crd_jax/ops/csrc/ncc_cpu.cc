// Local normalised cross-correlation (crd_jax.losses.ncc, eq. 1 of the paper) and its gradient with respect to the
// warped image, fused, exposed to XLA as two FFI calls.
//
// Why this exists: XLA's CPU backend runs NCC's forward + backward as 24 separate reduce_window passes (five box
// sums of 9^3 forward, three backward, three axes each) and ~10 elementwise fusions, every one a full-volume
// array in memory: at 128^3 on 2 cores it was ~60% of the registration loss. Here one pass per output plane does
// the three axes of all five (forward) or three (backward) box sums from cache and the NCC terms next to them.
//
// Forward (crd_ncc_fwd): for every voxel p, with S_x the box sum of x over the window of p (zeros outside),
//   f_mean = S_f / n, m_mean = S_m / n (n = the window's volume, border included, as VoxelMorph),
//   cross = S_fm - m_mean S_f - f_mean S_m + f_mean m_mean n,
//   f_var = S_ff - 2 f_mean S_f + f_mean^2 n,  m_var = S_mm - 2 m_mean S_m + m_mean^2 n,
//   cc = cross^2 / (f_var m_var + eps),
// written in the order crd_jax.losses' reference computes it. Out: the sum of cc over each plane (accumulated in
// double), and optionally the three coefficients of cc's derivative with respect to S_m, S_mm and S_fm:
//   c_fm = 2 cross / den, c_mm = -cc f_var / den, c_m = -f_mean c_fm - 2 m_mean c_mm   (den = f_var m_var + eps).
// Backward (crd_ncc_bwd): d/dm(q) = scale (B c_m + 2 m B c_mm + f B c_fm)(q), B the transposed box sum (the
// caller passes the transposed window offsets), scale the cotangent of the sum of cc.
//
// Box sums: a window covers [p - lo, p - lo + w) along each axis, out-of-range voxels skipped (adding XLA's padded
// zeros changes nothing). Sums run axis 0, then 1, then 2, each in window order, as XLA's three reduce_windows.
// A thread takes blocks of rows and walks the planes of each in order: the axis-0 sums of a block read its rows
// of the w0 planes around (from the L2 cache but for the newest plane; the backward's three coefficient planes
// through a ring of copies, see Ring), the axis-1 and axis-2 sums of each row follow, then the elementwise terms.
// Rows vectorise along the contiguous axis, several vectors of a row at once (RowBox).
//
// Layout: f, m (N, D, H, W) (a 2-D image is D = 1 with a window of 1 along it); coefficients (3, N, D, H, W);
// plane sums (N, D). Work is split over (volume, block of rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "huge_pages.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Window {
  int64_t w[3], lo[3];  // per axis: the window of p covers [p - lo, p - lo + w)
};

struct Dims {
  int64_t n, d, h, w;
};

inline void Range(int64_t p, int64_t w, int64_t lo, int64_t size, int64_t* begin, int64_t* end) {
  *begin = std::max<int64_t>(p - lo, 0);
  *end = std::min<int64_t>(p - lo + w, size);
}

// Rows are processed eight floats at a time (AVX2, the kernels' baseline); the last, partial vector of a row
// reads and writes only the row's own floats (masked), so the zero padding of the scratch rows stays zero.
inline __m256i TailMask(int64_t left) {
  static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - left));
}

inline __m256 Load(const float* p, int64_t left) {
  if (left <= 0) return _mm256_setzero_ps();
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, TailMask(left));
}

inline void Store(float* p, __m256 v, int64_t left) {
  if (left <= 0) return;
  if (left >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, TailMask(left), v);
  }
}

inline double LaneSum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double total = 0.0;
  for (float x : lanes) total += x;
  return total;
}

inline int64_t RoundUp8(int64_t n) { return (n + 7) / 8 * 8; }

// Output rows are processed in blocks of up to kRows (with the axis-1 window's rows around them): the w0 input
// planes of a block's axis-0 sums then stay in the L2 cache while the thread walks the planes of its block.
constexpr int64_t kRows = 32;

// Work items (volume, block of rows): the rows of block `block`, [y0, y1), and the rows of axis-0 sums they
// read, [ya, yb).
struct Block {
  int64_t y0, y1, ya, yb;
  Block(int64_t block, const Dims& s, const Window& win) {
    y0 = block * kRows;
    y1 = std::min(s.h, y0 + kRows);
    ya = std::max<int64_t>(y0 - win.lo[1], 0);
    yb = std::min<int64_t>(y1 - 1 - win.lo[1] + win.w[1], s.h);
  }
};

inline int64_t Blocks(const Dims& s) { return (s.h + kRows - 1) / kRows; }

// Per-thread buffers of K quantities: the axis-0 sums of a block's rows (stride `plane` floats), a zero-padded row
// of axis-0,1 sums (the window's lo2 zeros, the row, zeros to the end), and a row of full box sums.
struct Scratch {
  int64_t padded, row, plane;
  std::vector<float> q, r, t;
  Scratch(int K, const Dims& s, const Window& win)
      : padded(RoundUp8(s.w) + win.w[2] + 8),
        row(RoundUp8(s.w)),
        plane((kRows + win.w[1]) * s.w),
        q(K * plane),
        r(K * padded, 0.0f),
        t(K * row) {}
};

// The input planes of one row block's axis-0 window, copied once each into a per-thread ring of w0 slots.
// Why: the axis-0 sums read the block's rows of w0 consecutive planes for every output plane, and the planes of a
// volume with power-of-two sides lie a power of two bytes apart (64 KB at 128^3): the w0 x K rows of one step map to
// the same few cache sets and evict each other (the backward spent half its time on those loads). Slots sit at a
// stride that is not a multiple of 4 KB; each plane is read from memory once per block and re-read w0 times from
// cache. The sums keep their order (z ascending): the same bits as reading the planes in place. The forward's
// two input planes measured no faster through a ring, so it reads them in place.
struct Ring {
  int64_t slots, stride;
  std::vector<float> data;
  std::vector<int64_t> tag;  // the (volume, block, plane) key held in each slot, -1: none
  // A window holds at most min(w0, D) planes; z % slots then never puts two of them in one slot.
  Ring(int K, const Window& win, int64_t plane, int64_t depth)
      : slots(std::min(win.w[0], depth)), stride(SlotStride(plane)), data(K * slots * stride), tag(slots, -1) {}
  static int64_t SlotStride(int64_t plane) {
    const int64_t s = RoundUp8(plane) + 24;
    return s % 1024 == 0 ? s + 16 : s;  // never a multiple of 4 KB
  }
  const float* At(int k, int64_t z) const { return data.data() + (k * slots + z % slots) * stride; }
  // Planes [zb, ze) of block `key0` (key0 + z identifies a plane of a block): rows [first, first + span) of
  // the K inputs, input k at src[k] with planes hw floats apart.
  void Fill(int K, const float* const* src, int64_t hw, int64_t first, int64_t span, int64_t zb, int64_t ze,
            int64_t key0) {
    for (int64_t z = zb; z < ze; ++z) {
      const int64_t slot = z % slots;
      if (tag[slot] == key0 + z) continue;
      for (int k = 0; k < K; ++k)
        std::copy(src[k] + z * hw + first, src[k] + z * hw + first + span, data.data() + (k * slots + slot) * stride);
      tag[slot] = key0 + z;
    }
  }
};

// Axis-1 then axis-2 box sums of row y (of a block whose axis-0 sums in sc.q start at row ya) of K quantities into
// sc.t (K rows of sc.row floats).
void RowBox(int K, const Dims& s, int64_t y, int64_t ya, const Window& win, Scratch& sc) {
  int64_t b, e;
  Range(y, win.w[1], win.lo[1], s.h, &b, &e);
  b -= ya;
  e -= ya;
  const int64_t W = s.w;
  // Each output's sum is one chain of additions in window order (the reference's rounding); kGroup vectors of
  // outputs are summed side by side so that their chains overlap (one chain at a time waited on the adder's
  // latency: the two loops were most of the forward's time).
  constexpr int kGroup = 4;
  for (int k = 0; k < K; ++k) {
    const float* q = sc.q.data() + k * sc.plane;
    float* r = sc.r.data() + k * sc.padded;
    int64_t x = 0;
    for (; x + 8 * kGroup <= W; x += 8 * kGroup) {
      __m256 acc[kGroup];
      for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_loadu_ps(q + b * W + x + 8 * g);
      for (int64_t yy = b + 1; yy < e; ++yy)
        for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_add_ps(acc[g], _mm256_loadu_ps(q + yy * W + x + 8 * g));
      for (int g = 0; g < kGroup; ++g) _mm256_storeu_ps(r + win.lo[2] + x + 8 * g, acc[g]);
    }
    for (; x < W; x += 8) {
      __m256 acc = Load(q + b * W + x, W - x);
      for (int64_t yy = b + 1; yy < e; ++yy) acc = _mm256_add_ps(acc, Load(q + yy * W + x, W - x));
      Store(r + win.lo[2] + x, acc, W - x);
    }
    float* t = sc.t.data() + k * sc.row;
    x = 0;
    for (; x + 8 * kGroup <= W; x += 8 * kGroup) {
      __m256 acc[kGroup];
      for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_loadu_ps(r + x + 8 * g);
      for (int64_t j = 1; j < win.w[2]; ++j)
        for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_add_ps(acc[g], _mm256_loadu_ps(r + x + 8 * g + j));
      for (int g = 0; g < kGroup; ++g) _mm256_storeu_ps(t + x + 8 * g, acc[g]);
    }
    for (; x < W; x += 8) {
      __m256 acc = _mm256_loadu_ps(r + x);
      for (int64_t j = 1; j < win.w[2]; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(r + x + j));
      _mm256_storeu_ps(t + x, acc);
    }
  }
}

void NccForward(const float* f, const float* m, const Dims& s, const Window& win, float eps, float* plane_sums,
                float* coef) {
  const int64_t hw = s.h * s.w, total = s.n * s.d * hw, W = s.w;
  const __m256 size = _mm256_set1_ps(static_cast<float>(win.w[0] * win.w[1] * win.w[2]));
  const __m256 two = _mm256_set1_ps(2.0f), epsv = _mm256_set1_ps(eps), zero = _mm256_setzero_ps();
  const int64_t blocks = Blocks(s);
  std::vector<double> block_sums(s.n * s.d * blocks);
  crd::ParallelFor(s.n * blocks, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    Scratch sc(5, s, win);
    for (int64_t item = 0; item < (end - begin) * s.d; ++item) {
      const int64_t n = (begin + item / s.d) / blocks, bl = (begin + item / s.d) % blocks, p = item % s.d;
      const Block blk(bl, s, win);
      const int64_t span = (blk.yb - blk.ya) * W, first = blk.ya * W;
      float* q = sc.q.data();
      const int64_t qp = sc.plane;
      int64_t zb, ze;
      Range(p, win.w[0], win.lo[0], s.d, &zb, &ze);
      for (int64_t i = 0; i < span; i += 16) {  // a cache line of each of the 2 w0 input rows per step
        __m256 a0[2] = {zero, zero}, a1[2] = {zero, zero}, a2[2] = {zero, zero}, a3[2] = {zero, zero};
        __m256 a4[2] = {zero, zero};
        for (int64_t z = zb; z < ze; ++z) {
          const float* fz = f + (n * s.d + z) * s.h * W + first + i;
          const float* mz = m + (n * s.d + z) * s.h * W + first + i;
          for (int h = 0; h < 2; ++h) {
            const __m256 a = Load(fz + 8 * h, span - i - 8 * h), b = Load(mz + 8 * h, span - i - 8 * h);
            a0[h] = _mm256_add_ps(a0[h], a);
            a1[h] = _mm256_add_ps(a1[h], b);
            a2[h] = _mm256_add_ps(a2[h], _mm256_mul_ps(a, a));
            a3[h] = _mm256_add_ps(a3[h], _mm256_mul_ps(b, b));
            a4[h] = _mm256_add_ps(a4[h], _mm256_mul_ps(a, b));
          }
        }
        for (int h = 0; h < 2; ++h) {
          const int64_t at = i + 8 * h, left = span - at;
          Store(q + at, a0[h], left);
          Store(q + qp + at, a1[h], left);
          Store(q + 2 * qp + at, a2[h], left);
          Store(q + 3 * qp + at, a3[h], left);
          Store(q + 4 * qp + at, a4[h], left);
        }
      }
      double sum = 0.0;
      for (int64_t y = blk.y0; y < blk.y1; ++y) {
        RowBox(5, s, y, blk.ya, win, sc);
        const float* t = sc.t.data();
        const int64_t at = ((n * s.d + p) * s.h + y) * W;
        __m256 row_sum = zero;
        for (int64_t x = 0; x < W; x += 8) {
          const __m256 sf = _mm256_loadu_ps(t + x), sm = _mm256_loadu_ps(t + sc.row + x);
          const __m256 sff = _mm256_loadu_ps(t + 2 * sc.row + x), smm = _mm256_loadu_ps(t + 3 * sc.row + x);
          const __m256 sfm = _mm256_loadu_ps(t + 4 * sc.row + x);
          const __m256 fmean = _mm256_div_ps(sf, size), mmean = _mm256_div_ps(sm, size);
          // cross = sfm - mmean sf - fmean sm + fmean mmean size, left to right as the reference
          __m256 cross = _mm256_sub_ps(sfm, _mm256_mul_ps(mmean, sf));
          cross = _mm256_sub_ps(cross, _mm256_mul_ps(fmean, sm));
          cross = _mm256_add_ps(cross, _mm256_mul_ps(_mm256_mul_ps(fmean, mmean), size));
          __m256 fvar = _mm256_sub_ps(sff, _mm256_mul_ps(_mm256_mul_ps(two, fmean), sf));
          fvar = _mm256_add_ps(fvar, _mm256_mul_ps(_mm256_mul_ps(fmean, fmean), size));
          __m256 mvar = _mm256_sub_ps(smm, _mm256_mul_ps(_mm256_mul_ps(two, mmean), sm));
          mvar = _mm256_add_ps(mvar, _mm256_mul_ps(_mm256_mul_ps(mmean, mmean), size));
          const __m256 den = _mm256_add_ps(_mm256_mul_ps(fvar, mvar), epsv);
          __m256 value = _mm256_div_ps(_mm256_mul_ps(cross, cross), den);
          if (W - x < 8) value = _mm256_and_ps(value, _mm256_castsi256_ps(TailMask(W - x)));
          row_sum = _mm256_add_ps(row_sum, value);
          if (coef != nullptr) {
            const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), den);  // one division for both
            const __m256 dcross = _mm256_mul_ps(_mm256_mul_ps(two, cross), inv);
            const __m256 dmvar = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(zero, value), fvar), inv);
            const __m256 dm = _mm256_sub_ps(_mm256_sub_ps(zero, _mm256_mul_ps(fmean, dcross)),
                                            _mm256_mul_ps(_mm256_mul_ps(two, mmean), dmvar));
            Store(coef + at + x, dm, W - x);
            Store(coef + total + at + x, dmvar, W - x);
            Store(coef + 2 * total + at + x, dcross, W - x);
          }
        }
        sum += LaneSum(row_sum);
      }
      block_sums[(n * s.d + p) * blocks + bl] = sum;
    }
  });
  for (int64_t i = 0; i < s.n * s.d; ++i) {  // in a fixed order: the same sums whatever the threads
    double sum = 0.0;
    for (int64_t bl = 0; bl < blocks; ++bl) sum += block_sums[i * blocks + bl];
    plane_sums[i] = static_cast<float>(sum);
  }
}

void NccBackward(const float* coef, const float* f, const float* m, const Dims& s, const Window& win, float scale,
                 float* dm) {
  const int64_t hw = s.h * s.w, total = s.n * s.d * hw, W = s.w;
  const __m256 scalev = _mm256_set1_ps(scale), two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
  const int64_t blocks = Blocks(s);
  crd::ParallelFor(s.n * blocks, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    Scratch sc(3, s, win);
    Ring ring(3, win, sc.plane, s.d);
    for (int64_t item = 0; item < (end - begin) * s.d; ++item) {
      const int64_t n = (begin + item / s.d) / blocks, bl = (begin + item / s.d) % blocks, p = item % s.d;
      const Block blk(bl, s, win);
      const int64_t span = (blk.yb - blk.ya) * W, first = blk.ya * W;
      float* q = sc.q.data();
      const int64_t qp = sc.plane;
      int64_t zb, ze;
      Range(p, win.w[0], win.lo[0], s.d, &zb, &ze);
      const float* src[3] = {coef + n * s.d * hw, coef + total + n * s.d * hw, coef + 2 * total + n * s.d * hw};
      ring.Fill(3, src, hw, first, span, zb, ze, (n * blocks + bl) * s.d);
      for (int64_t i = 0; i < span; i += 16) {  // a cache line of each of the 3 w0 input rows per step
        __m256 a0[2] = {zero, zero}, a1[2] = {zero, zero}, a2[2] = {zero, zero};
        for (int64_t z = zb; z < ze; ++z) {
          const float* c0 = ring.At(0, z) + i, *c1 = ring.At(1, z) + i, *c2 = ring.At(2, z) + i;
          for (int h = 0; h < 2; ++h) {
            const int64_t left = span - i - 8 * h;
            a0[h] = _mm256_add_ps(a0[h], Load(c0 + 8 * h, left));
            a1[h] = _mm256_add_ps(a1[h], Load(c1 + 8 * h, left));
            a2[h] = _mm256_add_ps(a2[h], Load(c2 + 8 * h, left));
          }
        }
        for (int h = 0; h < 2; ++h) {
          const int64_t at = i + 8 * h, left = span - at;
          Store(q + at, a0[h], left);
          Store(q + qp + at, a1[h], left);
          Store(q + 2 * qp + at, a2[h], left);
        }
      }
      for (int64_t y = blk.y0; y < blk.y1; ++y) {
        RowBox(3, s, y, blk.ya, win, sc);
        const float* t = sc.t.data();
        const int64_t at = ((n * s.d + p) * s.h + y) * W;
        for (int64_t x = 0; x < W; x += 8) {
          const __m256 bm = _mm256_loadu_ps(t + x), bmm = _mm256_loadu_ps(t + sc.row + x);
          const __m256 bfm = _mm256_loadu_ps(t + 2 * sc.row + x);
          const __m256 mv = Load(m + at + x, W - x), fv = Load(f + at + x, W - x);
          __m256 g = _mm256_add_ps(bm, _mm256_mul_ps(_mm256_mul_ps(two, mv), bmm));
          g = _mm256_add_ps(g, _mm256_mul_ps(fv, bfm));
          Store(dm + at + x, _mm256_mul_ps(scalev, g), W - x);
        }
      }
    }
  });
}

ffi::Error ReadWindow(int64_t wd, int64_t wh, int64_t ww, int64_t ld, int64_t lh, int64_t lw, Window* win) {
  *win = Window{{wd, wh, ww}, {ld, lh, lw}};
  for (int k = 0; k < 3; ++k) {
    if (win->w[k] < 1 || win->lo[k] < 0 || win->lo[k] >= win->w[k])
      return ffi::Error::InvalidArgument("ncc: windows must be >= 1 with 0 <= offset < window");
  }
  return ffi::Error::Success();
}

ffi::Error ReadDims(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& y, Dims* s) {
  auto a = x.dimensions(), b = y.dimensions();
  if (a.size() != 4 || b.size() != 4) return ffi::Error::InvalidArgument("ncc: expected (N, D, H, W) volumes");
  for (int k = 0; k < 4; ++k) {
    if (a[k] != b[k]) return ffi::Error::InvalidArgument("ncc: the two volumes differ in shape");
  }
  *s = Dims{a[0], a[1], a[2], a[3]};
  return ffi::Error::Success();
}

ffi::Error NccFwdImpl(ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> plane_sums,
                      ffi::ResultBuffer<ffi::F32> coef, int64_t wd, int64_t wh, int64_t ww, int64_t ld, int64_t lh,
                      int64_t lw, float eps) {
  Dims s;
  Window win;
  if (auto e = ReadDims(f, m, &s); e.failure()) return e;
  if (auto e = ReadWindow(wd, wh, ww, ld, lh, lw, &win); e.failure()) return e;
  const int64_t voxels = s.n * s.d * s.h * s.w;
  if (static_cast<int64_t>(plane_sums->element_count()) != s.n * s.d)
    return ffi::Error::InvalidArgument("ncc: plane sums must be (N, D)");
  const int64_t c = static_cast<int64_t>(coef->element_count());
  if (c != 0 && c != 3 * voxels) return ffi::Error::InvalidArgument("ncc: coefficients must be (3, N, D, H, W) or empty");
  if (voxels == 0) return ffi::Error::Success();
  if (c != 0) crd::AdviseHugePagesOn(coef->untyped_data(), coef->size_bytes());
  NccForward(f.typed_data(), m.typed_data(), s, win, eps, plane_sums->typed_data(),
             c != 0 ? coef->typed_data() : nullptr);
  return ffi::Error::Success();
}

ffi::Error NccBwdImpl(ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> m,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> dm, int64_t wd, int64_t wh, int64_t ww,
                      int64_t ld, int64_t lh, int64_t lw) {
  Dims s;
  Window win;
  if (auto e = ReadDims(f, m, &s); e.failure()) return e;
  if (auto e = ReadWindow(wd, wh, ww, ld, lh, lw, &win); e.failure()) return e;
  const int64_t voxels = s.n * s.d * s.h * s.w;
  if (static_cast<int64_t>(coef.element_count()) != 3 * voxels || static_cast<int64_t>(dm->element_count()) != voxels)
    return ffi::Error::InvalidArgument("ncc grad: coefficients must be (3, N, D, H, W), the output (N, D, H, W)");
  if (scale.element_count() != 1) return ffi::Error::InvalidArgument("ncc grad: scale must be a scalar");
  if (voxels == 0) return ffi::Error::Success();
  crd::AdviseHugePagesOn(dm->untyped_data(), dm->size_bytes());
  NccBackward(coef.typed_data(), f.typed_data(), m.typed_data(), s, win, scale.typed_data()[0], dm->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdNccFwd, NccFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("wd")
                                  .Attr<int64_t>("wh")
                                  .Attr<int64_t>("ww")
                                  .Attr<int64_t>("ld")
                                  .Attr<int64_t>("lh")
                                  .Attr<int64_t>("lw")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdNccBwd, NccBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("wd")
                                  .Attr<int64_t>("wh")
                                  .Attr<int64_t>("ww")
                                  .Attr<int64_t>("ld")
                                  .Attr<int64_t>("lh")
                                  .Attr<int64_t>("lw"));
