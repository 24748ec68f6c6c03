// The training warp (crd_jax.ops.spatial.warp: linear, edge voxels repeated outside) on whole channels-last batches,
// optionally with its derivative with respect to the sampling position, exposed to XLA as one FFI call.
//
// Why this exists: training warps the moving image at the full resolution and differentiates the result with
// respect to the field. warp_cpu.cc + warp_grad_cpu.cc did that in two passes that each read the eight corners
// of every voxel (the backward pass again, to form the difference quotients), one volume and channel per call
// (transposes around them for channels-last arrays). Here the forward reads the corners once and also writes
// J = d image(c) / dc (three floats a voxel and channel), so the backward is the elementwise g * J that XLA fuses
// into the field's other gradient terms.
//
// Semantics, equal to warp_cpu.cc (value) and warp_grad_cpu.cc (derivative, before the cotangent's product),
// those of jax.scipy.ndimage.map_coordinates(image, x + u, order=1, mode="nearest") and its autodiff: lower corner
// floor(c), weights 1 - t and t with t = c - floor(c), corners clamped to the volume, the coordinate limited to
// [-1, n] first; the value sums ((w0 * w1) * w2) * v in axis-0-first order; d/dc_k is the difference of the two
// corners along axis k weighted by the other axes' weights (zero beyond the edge, where both are the same voxel).
// A NaN coordinate gives NaN.
//
// Layout: image (B, Di, Hi, Wi, C); displacement (B, D, H, W, 3) in voxels of the image; output (B, D, H, W, C);
// J (B, D, H, W, C, 3), or an empty buffer when not wanted.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "huge_pages.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline int64_t ClampIndex(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

inline float BoundedCoordinate(float c, int64_t n) {
  return c < -1.0f ? -1.0f : (c > static_cast<float>(n) ? static_cast<float>(n) : c);
}

struct Grid {
  int64_t b, d, h, w, c;
};

// One output voxel x of a row (sampling offsets z, yy; displacement row u), every channel. kChannels > 0: the
// channel count known at compile time (the training warp's single channel); 0: in.c.
template <int kChannels>
inline void Voxel(const float* vol, const Grid& in, float z, float yy, const float* u, int64_t x, int64_t voxel,
                  float* y, float* jac) {
  const int64_t n[3] = {in.d, in.h, in.w}, C = kChannels > 0 ? kChannels : in.c;
  const float c[3] = {z + u[3 * x], yy + u[3 * x + 1], static_cast<float>(x) + u[3 * x + 2]};
  if (std::isnan(c[0]) || std::isnan(c[1]) || std::isnan(c[2])) {
    for (int64_t ch = 0; ch < C; ++ch) {
      y[voxel * C + ch] = NAN;
      if (jac != nullptr) jac[(voxel * C + ch) * 3] = jac[(voxel * C + ch) * 3 + 1] = jac[(voxel * C + ch) * 3 + 2] = NAN;
    }
    return;
  }
  int64_t idx[3][2];
  float wt[3][2];
  for (int k = 0; k < 3; ++k) {
    const float ck = BoundedCoordinate(c[k], n[k]);
    const float lower = std::floor(ck);
    wt[k][1] = ck - lower;
    wt[k][0] = 1.0f - wt[k][1];
    const int64_t j = static_cast<int64_t>(lower);
    idx[k][0] = ClampIndex(j, n[k]);
    idx[k][1] = ClampIndex(j + 1, n[k]);
  }
  for (int64_t ch = 0; ch < C; ++ch) {
    float v[2][2][2];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const float* line = vol + (idx[0][a] * in.h + idx[1][b]) * in.w * C + ch;
        v[a][b][0] = line[idx[2][0] * C];
        v[a][b][1] = line[idx[2][1] * C];
      }
    float sum = 0.0f;
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const float wab = wt[0][a] * wt[1][b];
        for (int e = 0; e < 2; ++e) {
          const float term = (wab * wt[2][e]) * v[a][b][e];
          sum = (a | b | e) ? sum + term : term;
        }
      }
    y[voxel * C + ch] = sum;
    if (jac == nullptr) continue;
    float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f;
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        d0 += wt[1][a] * wt[2][b] * (v[1][a][b] - v[0][a][b]);
        d1 += wt[0][a] * wt[2][b] * (v[a][1][b] - v[a][0][b]);
        d2 += wt[0][a] * wt[1][b] * (v[a][b][1] - v[a][b][0]);
      }
    float* j = jac + (voxel * C + ch) * 3;
    j[0] = d0;
    j[1] = d1;
    j[2] = d2;
  }
}

// Eight (x, y, z) triples, 24 contiguous floats, split into one vector per component: three loads, nine lane
// permutations and six blends instead of three strided gathers (a gather costs per element; these are in-register).
// Triple i's component k is float 3i + k: vector 0 holds floats 0-7, vector 1 floats 8-15, vector 2 floats 16-23.
inline void Deinterleave3(const float* p, __m256 out[3]) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8), c = _mm256_loadu_ps(p + 16);
  // component 0: floats 0 3 6 | 9 12 15 | 18 21 -> a[0 3 6], b[1 4 7], c[2 5]
  out[0] = _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(a, _mm256_setr_epi32(0, 3, 6, 0, 0, 0, 0, 0)),
                                           _mm256_permutevar8x32_ps(b, _mm256_setr_epi32(0, 0, 0, 1, 4, 7, 0, 0)), 0x38),
                           _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 2, 5)), 0xC0);
  // component 1: floats 1 4 7 | 10 13 | 16 19 22 -> a[1 4 7], b[2 5], c[0 3 6]
  out[1] = _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(a, _mm256_setr_epi32(1, 4, 7, 0, 0, 0, 0, 0)),
                                           _mm256_permutevar8x32_ps(b, _mm256_setr_epi32(0, 0, 0, 2, 5, 0, 0, 0)), 0x18),
                           _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 3, 6)), 0xE0);
  // component 2: floats 2 5 | 8 11 14 | 17 20 23 -> a[2 5], b[0 3 6], c[1 4 7]
  out[2] = _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(a, _mm256_setr_epi32(2, 5, 0, 0, 0, 0, 0, 0)),
                                           _mm256_permutevar8x32_ps(b, _mm256_setr_epi32(0, 0, 0, 3, 6, 0, 0, 0)), 0x1C),
                           _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 4, 7)), 0xE0);
}

// The inverse of Deinterleave3: component vectors v[0..2] of eight triples stored as 24 contiguous floats.
inline void Interleave3(const __m256 v[3], float* p) {
  // floats 0-7: v0[0] v1[0] v2[0] v0[1] v1[1] v2[1] v0[2] v1[2]
  const __m256 a = _mm256_blend_ps(
      _mm256_blend_ps(_mm256_permutevar8x32_ps(v[0], _mm256_setr_epi32(0, 0, 0, 1, 0, 0, 2, 0)),
                      _mm256_permutevar8x32_ps(v[1], _mm256_setr_epi32(0, 0, 0, 0, 1, 0, 0, 2)), 0x92),
      _mm256_permutevar8x32_ps(v[2], _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 0, 0)), 0x24);
  // floats 8-15: v2[2] v0[3] v1[3] v2[3] v0[4] v1[4] v2[4] v0[5]
  const __m256 b = _mm256_blend_ps(
      _mm256_blend_ps(_mm256_permutevar8x32_ps(v[0], _mm256_setr_epi32(0, 3, 0, 0, 4, 0, 0, 5)),
                      _mm256_permutevar8x32_ps(v[1], _mm256_setr_epi32(0, 0, 3, 0, 0, 4, 0, 0)), 0x24),
      _mm256_permutevar8x32_ps(v[2], _mm256_setr_epi32(2, 0, 0, 3, 0, 0, 4, 0)), 0x49);
  // floats 16-23: v1[5] v2[5] v0[6] v1[6] v2[6] v0[7] v1[7] v2[7]
  const __m256 c = _mm256_blend_ps(
      _mm256_blend_ps(_mm256_permutevar8x32_ps(v[0], _mm256_setr_epi32(0, 0, 6, 0, 0, 7, 0, 0)),
                      _mm256_permutevar8x32_ps(v[1], _mm256_setr_epi32(5, 0, 0, 6, 0, 0, 7, 0)), 0x49),
      _mm256_permutevar8x32_ps(v[2], _mm256_setr_epi32(0, 5, 0, 0, 6, 0, 0, 7)), 0x92);
  _mm256_storeu_ps(p, a);
  _mm256_storeu_ps(p + 8, b);
  _mm256_storeu_ps(p + 16, c);
}

// Eight consecutive voxels x .. x + 7 of a single-channel row with AVX2 gathers: the same float operations in the
// same order as Voxel<1> (so the same results). Returns false, writing nothing, when a coordinate is NaN (the
// caller takes the scalar path). Indices are int32: the caller checks the volume has fewer than 2^31 voxels.
inline bool EightVoxels(const float* vol, const Grid& in, float z, float yy, const float* u, int64_t x, float* y,
                        float* jac) {
  const __m256 xs = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(x)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 ud[3];
  Deinterleave3(u + 3 * x, ud);
  __m256 c[3] = {_mm256_add_ps(_mm256_set1_ps(z), ud[0]), _mm256_add_ps(_mm256_set1_ps(yy), ud[1]),
                 _mm256_add_ps(xs, ud[2])};
  const __m256 nan = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(c[0], c[0], _CMP_UNORD_Q), _mm256_cmp_ps(c[1], c[1], _CMP_UNORD_Q)),
                                  _mm256_cmp_ps(c[2], c[2], _CMP_UNORD_Q));
  if (_mm256_movemask_ps(nan) != 0) return false;
  const int64_t n[3] = {in.d, in.h, in.w};
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 wt[3][2];
  __m256i idx[3][2];
  for (int k = 0; k < 3; ++k) {
    const __m256 ck = _mm256_max_ps(_mm256_min_ps(c[k], _mm256_set1_ps(static_cast<float>(n[k]))), _mm256_set1_ps(-1.0f));
    const __m256 lower = _mm256_floor_ps(ck);
    wt[k][1] = _mm256_sub_ps(ck, lower);
    wt[k][0] = _mm256_sub_ps(one, wt[k][1]);
    const __m256i j = _mm256_cvttps_epi32(lower), top = _mm256_set1_epi32(static_cast<int32_t>(n[k] - 1));
    const __m256i zero = _mm256_setzero_si256();
    idx[k][0] = _mm256_min_epi32(_mm256_max_epi32(j, zero), top);
    idx[k][1] = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(j, _mm256_set1_epi32(1)), zero), top);
  }
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(in.h)), wi = _mm256_set1_epi32(static_cast<int32_t>(in.w));
  __m256 v[2][2][2];
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const __m256i line = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(idx[0][a], hi), idx[1][b]), wi);
      v[a][b][0] = _mm256_i32gather_ps(vol, _mm256_add_epi32(line, idx[2][0]), 4);
      v[a][b][1] = _mm256_i32gather_ps(vol, _mm256_add_epi32(line, idx[2][1]), 4);
    }
  __m256 sum = _mm256_setzero_ps();
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const __m256 wab = _mm256_mul_ps(wt[0][a], wt[1][b]);
      for (int e = 0; e < 2; ++e) {
        const __m256 term = _mm256_mul_ps(_mm256_mul_ps(wab, wt[2][e]), v[a][b][e]);
        sum = (a | b | e) ? _mm256_add_ps(sum, term) : term;
      }
    }
  _mm256_storeu_ps(y + x, sum);
  if (jac == nullptr) return true;
  __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      d0 = _mm256_add_ps(d0, _mm256_mul_ps(_mm256_mul_ps(wt[1][a], wt[2][b]), _mm256_sub_ps(v[1][a][b], v[0][a][b])));
      d1 = _mm256_add_ps(d1, _mm256_mul_ps(_mm256_mul_ps(wt[0][a], wt[2][b]), _mm256_sub_ps(v[a][1][b], v[a][0][b])));
      d2 = _mm256_add_ps(d2, _mm256_mul_ps(_mm256_mul_ps(wt[0][a], wt[1][b]), _mm256_sub_ps(v[a][b][1], v[a][b][0])));
    }
  const __m256 j[3] = {d0, d1, d2};
  Interleave3(j, jac + 3 * x);
  return true;
}

template <int kChannels>
void WarpLinearBatch(const float* image, const Grid& in, const float* disp, const Grid& out, float* y, float* jac) {
  const int64_t C = kChannels > 0 ? kChannels : in.c;
  const bool vector = kChannels == 1 && in.d * in.h * in.w < (int64_t{1} << 31);
  crd::ParallelFor(out.b * out.d * out.h, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t batch = row / (out.d * out.h), r = row % (out.d * out.h);
      const float z = static_cast<float>(r / out.h), yy = static_cast<float>(r % out.h);
      const float* u = disp + row * out.w * 3;
      const float* vol = image + batch * in.d * in.h * in.w * C;
      float* yr = y + row * out.w * C;
      float* jr = jac != nullptr ? jac + row * out.w * C * 3 : nullptr;
      int64_t x = 0;
      if (vector) {
        for (; x + 8 <= out.w; x += 8) {
          if (!EightVoxels(vol, in, z, yy, u, x, yr, jr)) {
            for (int64_t i = x; i < x + 8; ++i) Voxel<kChannels>(vol, in, z, yy, u, i, i, yr, jr);
          }
        }
      }
      for (; x < out.w; ++x) Voxel<kChannels>(vol, in, z, yy, u, x, x, yr, jr);
    }
  });
}

ffi::Error WarpLinearImpl(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> disp, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> jac) {
  auto id = image.dimensions(), ud = disp.dimensions();
  if (id.size() != 5 || ud.size() != 5 || ud[4] != 3 || id[0] != ud[0])
    return ffi::Error::InvalidArgument("warp linear: expected image (B, D, H, W, C), displacement (B, D, H, W, 3)");
  if (id[1] < 1 || id[2] < 1 || id[3] < 1) return ffi::Error::InvalidArgument("warp linear: empty image");
  const Grid in{id[0], id[1], id[2], id[3], id[4]}, out{ud[0], ud[1], ud[2], ud[3], id[4]};
  const int64_t values = out.b * out.d * out.h * out.w * out.c;
  if (static_cast<int64_t>(y->element_count()) != values)
    return ffi::Error::InvalidArgument("warp linear: output must be (B, D, H, W, C) of the displacement's grid");
  const int64_t j = static_cast<int64_t>(jac->element_count());
  if (j != 0 && j != 3 * values) return ffi::Error::InvalidArgument("warp linear: J must be (B, D, H, W, C, 3) or empty");
  if (values == 0) return ffi::Error::Success();
  float* jp = j != 0 ? jac->typed_data() : nullptr;
  crd::AdviseHugePagesOn(y->untyped_data(), y->size_bytes());
  if (jp != nullptr) crd::AdviseHugePagesOn(jac->untyped_data(), jac->size_bytes());
  if (in.c == 1) {
    WarpLinearBatch<1>(image.typed_data(), in, disp.typed_data(), out, y->typed_data(), jp);
  } else {
    WarpLinearBatch<0>(image.typed_data(), in, disp.typed_data(), out, y->typed_data(), jp);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdWarpLinear, WarpLinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
