// Linear upsampling by whole factors (crd_jax.ops.spatial.resize, hence upsample_field: up(phi) of eq. 5 and 7)
// and its transpose, exposed to XLA as two FFI calls.
//
// Why this exists: XLA wrote the upsampling as a stencil of shifted slices per axis, and fused it into every
// consumer of the full-resolution field; in a low-resolution model's training step the field feeds the warp,
// grad-L2 and their gradients, and the gradient's transpose stencil got the cotangents fused into it in turn,
// so the stencils were recomputed per use: at 128^3 (field 64^3 -> 128^3) the loss of a low-resolution model
// took ~100 ms against ~40 ms for the same loss on a given full-resolution field (2 cores, Zen 4). Here the
// field is written once and the transpose reads the cotangent once.
//
// Semantics (half-pixel centres, edge voxels repeated; the XLA stencil in spatial.py is the reference): along an
// axis of n voxels upsampled by k, output q = k i + r samples the input at i + o_r, o_r = (r + 0.5) / k - 0.5:
// taps (i - 1, -o_r) and (i, 1 + o_r) if o_r < 0, else (i, 1 - o_r) and (i + 1, o_r), indices clamped to
// [0, n - 1]. The 3-D weight of a tap is the product of its axes' weights; taps of weight 0 are left out (not
// multiplied by 0), so a NaN or inf reaches only the outputs it contributes to, as in the reference.
//
// Forward (crd_upsample_linear): x (B, D, H, W, C) -> y (B, kD D, kH H, kW W, C); the factors are the ratios of
// the shapes. For each output row (b, z, y) the four input rows its (z, y) taps name are blended into one row
// first, then the row is upsampled along W.
// Transpose (crd_upsample_linear_t): g (B, kD D, kH H, kW W, C) -> dx (B, D, H, W, C), the adjoint of the
// forward: each input row (b, i, j) gathers the output rows whose taps name it (at most 2 kD x 2 kH of them,
// weighted), then the W axis the same way. Gather-only, so the threads never write the same voxel, and the
// order of every sum is fixed (the same result whatever the threads).
// A 2-D array is passed as D = 1 (factor 1 on that axis).
//
// Plane order (3-D volumes with enough planes to share among the threads; the row order above otherwise). The W
// pass is the only scalar work (channels interleaved), so it runs on as few rows as possible, and the full-size
// array is streamed once: the forward upsamples each input row along W once per thread (a ring of two input
// planes, each input plane serving the k_D output planes between it and the next) and forms each output row as
// the weighted sum of its (z, y) taps' rows, contiguous vector work; the transpose reduces each output plane
// along H once per thread into a ring of 2 k_D planes (an input plane gathers the output planes whose taps name
// it, consecutive input planes share them), sums them along D, then gathers along W on the input's rows. Row
// order read the full-size array once per (z, y) tap of its rows: four times at n = 2, from memory at 128^3.
// Same taps and weights as the row order; the sums are grouped differently (a rounding difference).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "huge_pages.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape5 {
  int64_t b, d, h, w, c;
};

// The two taps of one output index along an axis.
struct Taps {
  int64_t a, b;
  float wa, wb;
};

std::vector<Taps> AxisTaps(int64_t n, int64_t k) {
  std::vector<Taps> taps(n * k);
  for (int64_t q = 0; q < n * k; ++q) {
    const int64_t i = q / k, r = q % k;
    const float o = static_cast<float>((static_cast<double>(r) + 0.5) / static_cast<double>(k) - 0.5);
    auto clamp = [n](int64_t j) { return j < 0 ? int64_t{0} : (j >= n ? n - 1 : j); };
    taps[q] = o < 0.0f ? Taps{clamp(i - 1), i, -o, 1.0f + o} : Taps{i, clamp(i + 1), 1.0f - o, o};
  }
  return taps;
}

// For each input index, the output indices whose taps name it and their weights (the transpose's gather lists,
// in increasing output order; two taps on one input, as at a clamped edge, are one entry of summed weight).
struct Inverse {
  std::vector<int64_t> start;  // entries of input j: [start[j], start[j + 1])
  std::vector<int64_t> index;
  std::vector<float> weight;
};

Inverse InvertTaps(const std::vector<Taps>& taps, int64_t n) {
  std::vector<std::vector<std::pair<int64_t, float>>> lists(n);
  for (int64_t q = 0; q < static_cast<int64_t>(taps.size()); ++q) {
    const Taps& t = taps[q];
    if (t.a == t.b) {
      lists[t.a].push_back({q, t.wa + t.wb});
      continue;
    }
    if (t.wa != 0.0f) lists[t.a].push_back({q, t.wa});
    if (t.wb != 0.0f) lists[t.b].push_back({q, t.wb});
  }
  Inverse inv;
  inv.start.push_back(0);
  for (const auto& list : lists) {
    for (const auto& [q, w] : list) {
      inv.index.push_back(q);
      inv.weight.push_back(w);
    }
    inv.start.push_back(static_cast<int64_t>(inv.index.size()));
  }
  return inv;
}

// One row of n_in * c values upsampled along W into n_out * c values (taps tx, taps of weight 0 left out).
inline void UpsampleRowW(const float* t, const std::vector<Taps>& tx, int64_t c, float* o) {
  for (int64_t q = 0; q < static_cast<int64_t>(tx.size()); ++q) {
    const Taps& X = tx[q];
    const float* ta = t + X.a * c;
    const float* tb = t + X.b * c;
    if (X.wb == 0.0f) {
      for (int64_t ch = 0; ch < c; ++ch) o[q * c + ch] = X.wa * ta[ch];
    } else {
      for (int64_t ch = 0; ch < c; ++ch) o[q * c + ch] = X.wa * ta[ch] + X.wb * tb[ch];
    }
  }
}

// o = sum_k weights[k] * rows[k] over n values (terms >= 1), in the order given.
inline void BlendRows(const float* const* rows, const float* weights, int terms, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = weights[0] * rows[0][i];
  for (int k = 1; k < terms; ++k) {
    const float w = weights[k];
    const float* src = rows[k];
    for (int64_t i = 0; i < n; ++i) o[i] += w * src[i];
  }
}

// The W transpose of one row: each of the input's n_in * c values gathers the output values its taps name.
inline void GatherRowW(const float* t, const Inverse& ix, int64_t n_in, int64_t c, float* o) {
  for (int64_t j = 0; j < n_in; ++j) {
    for (int64_t ch = 0; ch < c; ++ch) {
      float acc = 0.0f;
      for (int64_t e = ix.start[j]; e < ix.start[j + 1]; ++e) acc += ix.weight[e] * t[ix.index[e] * c + ch];
      o[j * c + ch] = acc;
    }
  }
}

void UpsampleForward(const float* x, const Shape5& in, const Shape5& out, float* y) {
  const auto tz = AxisTaps(in.d, out.d / in.d), ty = AxisTaps(in.h, out.h / in.h), tx = AxisTaps(in.w, out.w / in.w);
  const int64_t c = in.c, in_row = in.w * c, out_row = out.w * c;
  const int64_t rows = out.b * out.d * out.h;
  crd::ParallelFor(rows, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> blend(in_row);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / (out.d * out.h), z = (r / out.h) % out.d, yy = r % out.h;
      const Taps& Z = tz[z];
      const Taps& Y = ty[yy];
      const float* base = x + bi * in.d * in.h * in_row;
      // the rows with a nonzero weight only: 0 * inf or 0 * NaN from a tap that does not contribute (a factor-1
      // axis, the D = 1 axis of a 2-D array) would otherwise turn a finite or infinite output into NaN
      const float* rows_in[4];
      float weights[4];
      int terms = 0;
      for (int i = 0; i < 2; ++i) {
        const int64_t zi = i == 0 ? Z.a : Z.b;
        const float wz = i == 0 ? Z.wa : Z.wb;
        for (int j = 0; j < 2; ++j) {
          const int64_t yj = j == 0 ? Y.a : Y.b;
          const float w = wz * (j == 0 ? Y.wa : Y.wb);
          if (w == 0.0f) continue;
          rows_in[terms] = base + (zi * in.h + yj) * in_row;
          weights[terms++] = w;
        }
      }
      BlendRows(rows_in, weights, terms, in_row, blend.data());
      UpsampleRowW(blend.data(), tx, c, y + r * out_row);
    }
  });
}

void UpsampleTranspose(const float* g, const Shape5& out, const Shape5& in, float* dx) {
  const auto iz = InvertTaps(AxisTaps(in.d, out.d / in.d), in.d);
  const auto iy = InvertTaps(AxisTaps(in.h, out.h / in.h), in.h);
  const auto ix = InvertTaps(AxisTaps(in.w, out.w / in.w), in.w);
  const int64_t c = in.c, in_row = in.w * c, out_row = out.w * c;
  const int64_t rows = in.b * in.d * in.h;
  crd::ParallelFor(rows, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    std::vector<float> gathered(out_row);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / (in.d * in.h), z = (r / in.h) % in.d, yy = r % in.h;
      const float* base = g + bi * out.d * out.h * out_row;
      float* t = gathered.data();
      for (int64_t i = 0; i < out_row; ++i) t[i] = 0.0f;
      for (int64_t ez = iz.start[z]; ez < iz.start[z + 1]; ++ez) {
        for (int64_t ey = iy.start[yy]; ey < iy.start[yy + 1]; ++ey) {
          const float w = iz.weight[ez] * iy.weight[ey];
          const float* src = base + (iz.index[ez] * out.h + iy.index[ey]) * out_row;
          for (int64_t i = 0; i < out_row; ++i) t[i] += w * src[i];
        }
      }
      GatherRowW(t, ix, in.w, c, dx + r * in_row);
    }
  });
}

// A small per-thread cache of planes keyed by an integer tag (slot = tag mod slots): the rings of the plane order.
struct PlaneRing {
  std::vector<float> data;
  std::vector<int64_t> tag;
  int64_t plane;
  PlaneRing(int64_t slots, int64_t plane_size) : data(slots * plane_size), tag(slots, -1), plane(plane_size) {}
  // (pointer to the slot, whether it already holds `key`); the slot is claimed for `key` either way
  std::pair<float*, bool> Get(int64_t key) {
    const int64_t slot = key % static_cast<int64_t>(tag.size());
    const bool hit = tag[slot] == key;
    tag[slot] = key;
    return {data.data() + slot * plane, hit};
  }
};

// Worth the plane order: enough planes for every thread (the row order spreads a few planes' rows instead).
bool PlaneOrder(int64_t planes) { return planes >= 4 * static_cast<int64_t>(crd::NumThreads()); }

void UpsampleForwardPlanes(const float* x, const Shape5& in, const Shape5& out, float* y) {
  const auto tz = AxisTaps(in.d, out.d / in.d), ty = AxisTaps(in.h, out.h / in.h), tx = AxisTaps(in.w, out.w / in.w);
  const int64_t c = in.c, in_row = in.w * c, out_row = out.w * c, wide_plane = in.h * out_row;
  crd::ParallelFor(out.b * out.d, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    PlaneRing ring(2, wide_plane);  // input planes upsampled along W; the taps of a plane are consecutive planes
    auto wide = [&](int64_t bi, int64_t zi) {
      auto [plane, hit] = ring.Get(bi * in.d + zi);
      if (!hit) {
        const float* src = x + (bi * in.d + zi) * in.h * in_row;
        for (int64_t j = 0; j < in.h; ++j) UpsampleRowW(src + j * in_row, tx, c, plane + j * out_row);
      }
      return static_cast<const float*>(plane);
    };
    for (int64_t p = begin; p < end; ++p) {
      const int64_t bi = p / out.d, z = p % out.d;
      const Taps& Z = tz[z];
      // both planes first: the ring has two slots, and Z.a, Z.b (consecutive or equal) never share a slot
      const float* planes[2] = {wide(bi, Z.a), Z.b == Z.a ? nullptr : wide(bi, Z.b)};
      for (int64_t yy = 0; yy < out.h; ++yy) {
        const Taps& Y = ty[yy];
        const float* rows_in[4];
        float weights[4];
        int terms = 0;
        for (int i = 0; i < 2; ++i) {
          const float* plane = i == 0 ? planes[0] : (planes[1] != nullptr ? planes[1] : planes[0]);
          const float wz = i == 0 ? Z.wa : Z.wb;
          for (int j = 0; j < 2; ++j) {
            const float w = wz * (j == 0 ? Y.wa : Y.wb);
            if (w == 0.0f) continue;  // 0 * inf: see UpsampleForward
            rows_in[terms] = plane + (j == 0 ? Y.a : Y.b) * out_row;
            weights[terms++] = w;
          }
        }
        BlendRows(rows_in, weights, terms, out_row, y + (p * out.h + yy) * out_row);
      }
    }
  });
}

void UpsampleTransposePlanes(const float* g, const Shape5& out, const Shape5& in, float* dx) {
  const auto iz = InvertTaps(AxisTaps(in.d, out.d / in.d), in.d);
  const auto iy = InvertTaps(AxisTaps(in.h, out.h / in.h), in.h);
  const auto ix = InvertTaps(AxisTaps(in.w, out.w / in.w), in.w);
  const int64_t c = in.c, in_row = in.w * c, out_row = out.w * c, narrow_plane = in.h * out_row;
  const int64_t kd = out.d / in.d;
  crd::ParallelFor(in.b * in.d, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    // output planes reduced along H: an input plane gathers at most 2 k_D consecutive output planes, so 2 k_D
    // slots keep every plane the next input plane shares
    PlaneRing ring(2 * kd, narrow_plane);
    std::vector<float> t(out_row);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t bi = p / in.d, z = p % in.d;
      const float* reduced[64];
      float wz[64];
      int64_t terms = 0;
      for (int64_t ez = iz.start[z]; ez < iz.start[z + 1]; ++ez) {
        const int64_t q = iz.index[ez];
        auto [plane, hit] = ring.Get(bi * out.d + q);
        if (!hit) {
          const float* src = g + (bi * out.d + q) * out.h * out_row;
          for (int64_t j = 0; j < in.h; ++j) {
            float* r = plane + j * out_row;
            for (int64_t i = 0; i < out_row; ++i) r[i] = 0.0f;
            for (int64_t ey = iy.start[j]; ey < iy.start[j + 1]; ++ey) {
              const float w = iy.weight[ey];
              const float* row = src + iy.index[ey] * out_row;
              for (int64_t i = 0; i < out_row; ++i) r[i] += w * row[i];
            }
          }
        }
        reduced[terms] = plane;
        wz[terms++] = iz.weight[ez];
      }
      for (int64_t j = 0; j < in.h; ++j) {
        for (int64_t i = 0; i < out_row; ++i) t[i] = 0.0f;
        for (int64_t e = 0; e < terms; ++e) {
          const float w = wz[e];
          const float* row = reduced[e] + j * out_row;
          for (int64_t i = 0; i < out_row; ++i) t[i] += w * row[i];
        }
        GatherRowW(t.data(), ix, in.w, c, dx + (p * in.h + j) * in_row);
      }
    }
  });
}

template <typename Dims>
Shape5 ToShape(const Dims& d) {
  return Shape5{d[0], d[1], d[2], d[3], d[4]};
}

// small: the low-resolution array, big: the upsampled one; the factors are the ratios of their spatial sizes.
ffi::Error CheckShapes(const Shape5& small, const Shape5& big, const char* what) {
  if (small.b != big.b || small.c != big.c || small.d < 1 || small.h < 1 || small.w < 1 || big.d % small.d ||
      big.h % small.h || big.w % small.w)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": the upsampled array's spatial sizes must be whole multiples of the input's");
  return ffi::Error::Success();
}

ffi::Error UpsampleImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  if (x.dimensions().size() != 5 || y->dimensions().size() != 5)
    return ffi::Error::InvalidArgument("upsample linear: expected arrays (B, D, H, W, C)");
  const Shape5 in = ToShape(x.dimensions()), out = ToShape(y->dimensions());
  if (auto e = CheckShapes(in, out, "upsample linear"); e.failure()) return e;
  if (y->element_count() == 0) return ffi::Error::Success();
  crd::AdviseHugePagesOn(y->untyped_data(), y->size_bytes());
  if (PlaneOrder(out.b * out.d) && out.d / in.d <= 16) {
    UpsampleForwardPlanes(x.typed_data(), in, out, y->typed_data());
  } else {
    UpsampleForward(x.typed_data(), in, out, y->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error UpsampleTransposeImpl(ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx) {
  if (g.dimensions().size() != 5 || dx->dimensions().size() != 5)
    return ffi::Error::InvalidArgument("upsample linear transpose: expected arrays (B, D, H, W, C)");
  const Shape5 out = ToShape(g.dimensions()), in = ToShape(dx->dimensions());
  if (auto e = CheckShapes(in, out, "upsample linear transpose"); e.failure()) return e;
  if (dx->element_count() == 0) return ffi::Error::Success();
  if (PlaneOrder(in.b * in.d) && out.d / in.d <= 16) {  // <= 2 k_D <= 32 output planes per input plane
    UpsampleTransposePlanes(g.typed_data(), out, in, dx->typed_data());
  } else {
    UpsampleTranspose(g.typed_data(), out, in, dx->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdUpsampleLinear, UpsampleImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdUpsampleLinearT, UpsampleTransposeImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
