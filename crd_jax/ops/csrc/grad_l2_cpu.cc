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
