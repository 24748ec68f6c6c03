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
#include <cmath>
#include <cstdint>

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

// kChannels > 0: the channel count known at compile time (the training warp's single channel); 0: in.c.
template <int kChannels>
void WarpLinearBatch(const float* image, const Grid& in, const float* disp, const Grid& out, float* y, float* jac) {
  const int64_t n[3] = {in.d, in.h, in.w}, C = kChannels > 0 ? kChannels : in.c;
  crd::ParallelFor(out.b * out.d * out.h, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t batch = row / (out.d * out.h), r = row % (out.d * out.h);
      const float z = static_cast<float>(r / out.h), yy = static_cast<float>(r % out.h);
      const float* u = disp + row * out.w * 3;
      const float* vol = image + batch * in.d * in.h * in.w * C;
      for (int64_t x = 0; x < out.w; ++x) {
        const int64_t voxel = row * out.w + x;
        const float c[3] = {z + u[3 * x], yy + u[3 * x + 1], static_cast<float>(x) + u[3 * x + 2]};
        if (std::isnan(c[0]) || std::isnan(c[1]) || std::isnan(c[2])) {
          for (int64_t ch = 0; ch < C; ++ch) {
            y[voxel * C + ch] = NAN;
            if (jac != nullptr) jac[(voxel * C + ch) * 3] = jac[(voxel * C + ch) * 3 + 1] = jac[(voxel * C + ch) * 3 + 2] = NAN;
          }
          continue;
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
