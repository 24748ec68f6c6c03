// The displacement field's smoothness term (crd_jax.losses.grad_l2, eq. 2 of the paper), exposed to XLA as an FFI
// call; its gradient stays XLA's (crd_jax/ops/grad_l2.py: slices fused into the field's other cotangents).
//
// Why this exists: XLA's CPU backend materialises the three arrays of forward differences (jnp.diff, one full-size
// field each) before reducing them, and its gradient reads them again: at 128^3 on 2 cores the term took as long
// as the fused NCC. Here the forward reads the field once and writes three numbers.
//
// Forward (crd_grad_l2_fwd): for every axis k of the field (B, D, H, W, C), the sum of (u[i + e_k] - u[i])^2
// over the voxels that have a neighbour along k, accumulated per row in float lanes and across rows in double, in
// a fixed order (the same result whatever the threads).
// A 2-D field is passed as D = 1 (its axis-0 sum is 0 and the caller ignores it).
//
// Coarse form (crd_grad_l2_coarse): for a field v = f U phi upsampled from phi (crd_jax/ops/grad_l2.py derives
// it), L_reg(v) = <phi, Z> with Z = sum_k w_k (G_0 x G_1 x G_2)^(k) phi, G_j^(k) the axis' Gram matrix of the
// upsampling (U^T U, tridiagonal) or, for j = k, of its differences ((D U)^T (D U), pentadiagonal). This kernel
// writes Z, separably on the coarse grid, sharing factors:
//   a = S_2 phi, b = D_2 phi (along W);  c = S_1 a, d = w_1 D_1 a + w_2 S_1 b (along H);  Z = w_0 D_0 c + S_0 d.
// Bands arrive as (3 axes, 2 matrices [smooth, diff], 5 offsets -2..2, N) with N >= every axis length; band
// (o, i) multiplies x[i + o] into y[i] and is 0 where i + o leaves the axis. Every output element is a fixed
// sum in a fixed order: the same result whatever the threads. A 2-D field: D = 1, axis 0's smooth band the
// identity, w_0 = 0.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Field {
  int64_t b, d, h, w, c;
};

// Sum of (a[i] - b[i])^2 over n floats, eight float lanes then the lanes in double.
double SquaredDistance(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  double total = 0.0;
  for (float v : lanes) total += v;
  for (; i < n; ++i) {
    const float d = a[i] - b[i];
    total += d * d;
  }
  return total;
}

void GradL2Forward(const float* u, const Field& f, float* sums) {
  const int64_t rows = f.b * f.d * f.h, len = f.w * f.c, plane = f.h * len;
  std::vector<double> per_row(3 * rows);
  crd::ParallelFor(rows, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t z = (r / f.h) % f.d, y = r % f.h;
      const float* row = u + r * len;
      per_row[3 * r] = z + 1 < f.d ? SquaredDistance(row + plane, row, len) : 0.0;
      per_row[3 * r + 1] = y + 1 < f.h ? SquaredDistance(row + len, row, len) : 0.0;
      per_row[3 * r + 2] = SquaredDistance(row + f.c, row, len - f.c);
    }
  });
  for (int k = 0; k < 3; ++k) {
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += per_row[3 * r + k];
    sums[k] = static_cast<float>(total);
  }
}

// y = scale * A x (+ y if accumulate) along an axis of length n: layout [outer][n][inner]; band[o + 2][i] the
// coefficient of x[i + o] in y[i]. inner > 1: whole rows of inner values (contiguous, vectorised by the
// compiler); inner == 1 never happens (the W axis is handled by ApplyW).
void ApplyRows(const float* x, float* y, const float* band, int64_t n_pad, int64_t outer, int64_t n, int64_t inner,
               float scale, bool accumulate) {
  crd::ParallelFor(outer * n, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o0 = r / n, i = r % n;
      float* out = y + r * inner;
      if (!accumulate)
        for (int64_t e = 0; e < inner; ++e) out[e] = 0.0f;
      for (int o = -2; o <= 2; ++o) {
        if (i + o < 0 || i + o >= n) continue;
        const float w = scale * band[(o + 2) * n_pad + i];
        if (w == 0.0f) continue;
        const float* in = x + (o0 * n + i + o) * inner;
        for (int64_t e = 0; e < inner; ++e) out[e] += w * in[e];
      }
    }
  });
}

// The same along W with C channels interleaved: rows of W * C values, band expanded per value.
void ApplyW(const float* x, float* y, const float* band, int64_t n_pad, int64_t rows, int64_t w, int64_t c) {
  const int64_t len = w * c;
  std::vector<float> coef(5 * len);
  for (int o = -2; o <= 2; ++o)
    for (int64_t e = 0; e < len; ++e) {
      const int64_t i = e / c;
      coef[(o + 2) * len + e] = (i + o < 0 || i + o >= w) ? 0.0f : band[(o + 2) * n_pad + i];
    }
  crd::ParallelFor(rows, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = x + r * len;
      float* out = y + r * len;
      for (int64_t e = 0; e < len; ++e) out[e] = 0.0f;
      for (int o = -2; o <= 2; ++o) {
        const float* k = coef.data() + (o + 2) * len;
        const int64_t lo = o < 0 ? -o * c : 0, hi = o > 0 ? len - o * c : len;  // where x[i + o] exists
        const int64_t shift = o * c;
        for (int64_t e = lo; e < hi; ++e) out[e] += k[e] * in[e + shift];
      }
    }
  });
}

ffi::Error GradL2CoarseImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> bands, ffi::Buffer<ffi::F32> weights,
                            ffi::ResultBuffer<ffi::F32> z) {
  auto d = phi.dimensions();
  auto bd = bands.dimensions();
  if (d.size() != 5) return ffi::Error::InvalidArgument("grad l2 coarse: expected a field (B, D, H, W, C)");
  const Field f{d[0], d[1], d[2], d[3], d[4]};
  if (bd.size() != 4 || bd[0] != 3 || bd[1] != 2 || bd[2] != 5 || bd[3] < f.d || bd[3] < f.h || bd[3] < f.w)
    return ffi::Error::InvalidArgument("grad l2 coarse: bands must be (3, 2, 5, N), N >= every axis length");
  if (weights.element_count() != 3) return ffi::Error::InvalidArgument("grad l2 coarse: weights must be (3,)");
  if (z->element_count() != phi.element_count()) return ffi::Error::InvalidArgument("grad l2 coarse: Z is phi's shape");
  const int64_t count = static_cast<int64_t>(phi.element_count());
  if (count == 0) return ffi::Error::Success();
  const int64_t n_pad = bd[3];
  const float* b = bands.typed_data();
  auto band = [&](int axis, int which) { return b + (axis * 2 + which) * 5 * n_pad; };
  const float* w = weights.typed_data();
  // per calling thread and kept: fresh temporaries would page-fault on every step (12 MB at 64^3 x 3)
  static thread_local std::vector<float> a, bb, c, dd;
  for (auto* v : {&a, &bb, &c, &dd})
    if (static_cast<int64_t>(v->size()) < count) v->resize(count);
  const float* x = phi.typed_data();
  const int64_t row = f.w * f.c, plane = f.h * row;
  ApplyW(x, a.data(), band(2, 0), n_pad, f.b * f.d * f.h, f.w, f.c);   // a = S_2 phi
  ApplyW(x, bb.data(), band(2, 1), n_pad, f.b * f.d * f.h, f.w, f.c);  // b = D_2 phi
  ApplyRows(a.data(), c.data(), band(1, 0), n_pad, f.b * f.d, f.h, row, 1.0f, false);   // c = S_1 a
  ApplyRows(a.data(), dd.data(), band(1, 1), n_pad, f.b * f.d, f.h, row, w[1], false);  // d = w_1 D_1 a
  ApplyRows(bb.data(), dd.data(), band(1, 0), n_pad, f.b * f.d, f.h, row, w[2], true);  //   + w_2 S_1 b
  float* out = z->typed_data();
  ApplyRows(c.data(), out, band(0, 1), n_pad, f.b, f.d, plane, w[0], false);  // Z = w_0 D_0 c
  ApplyRows(dd.data(), out, band(0, 0), n_pad, f.b, f.d, plane, 1.0f, true);  //   + S_0 d
  return ffi::Error::Success();
}

ffi::Error ReadField(const ffi::Buffer<ffi::F32>& u, Field* f) {
  auto d = u.dimensions();
  if (d.size() != 5) return ffi::Error::InvalidArgument("grad l2: expected a field (B, D, H, W, C)");
  *f = Field{d[0], d[1], d[2], d[3], d[4]};
  return ffi::Error::Success();
}

ffi::Error GradL2FwdImpl(ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> sums) {
  Field f;
  if (auto e = ReadField(u, &f); e.failure()) return e;
  if (sums->element_count() != 3) return ffi::Error::InvalidArgument("grad l2: sums must be (3,)");
  float* s = sums->typed_data();
  s[0] = s[1] = s[2] = 0.0f;
  if (u.element_count() == 0) return ffi::Error::Success();
  GradL2Forward(u.typed_data(), f, s);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdGradL2Fwd, GradL2FwdImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdGradL2Coarse, GradL2CoarseImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
