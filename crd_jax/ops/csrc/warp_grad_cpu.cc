// Gradient of the linear warp (warp_cpu.cc, order 1) with respect to the displacement, exposed to XLA as an FFI
// call: du(x) = g(x) * d image(c) / d c at c = x + u(x), the derivative JAX's autodiff of
// jax.scipy.ndimage.map_coordinates(image, c, order=1, mode="nearest") gives.
//
// Why this exists: training differentiates the warp with respect to the field at the full resolution every step.
// XLA runs it as eight gathers over materialised index arrays plus the elementwise products of the weights'
// derivatives: at 128^3 the warp's forward + backward took ~3.4x its forward, the largest part of the loss. Here
// each voxel reads its eight corners once (gather only; nothing is scattered) and writes three numbers.
//
// Semantics (those of map_coordinates' autodiff): lower corner floor(c), weights 1 - t and t with t = c - floor(c),
// corners clamped to the volume; floor has no derivative, so d/dc_k is the difference of the two corners along
// axis k weighted by the other axes' weights. Beyond the edge both corners are the same voxel: zero. The
// coordinate is limited to [-1, n] first, as in warp_cpu.cc (there both corners are already the edge voxel, so
// neither the value nor the derivative changes). A NaN coordinate gives NaN.
//
// Layout: image (Di, Hi, Wi); displacement (D, H, W, 3) in voxels of the image; cotangent g (D, H, W);
// output (D, H, W, 3).
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

void WarpLinearGrad(const float* image, int64_t di, int64_t hi, int64_t wi, const float* disp, const float* g,
                    int64_t d, int64_t h, int64_t w, float* du) {
  const int64_t n[3] = {di, hi, wi};
  crd::ParallelFor(d * h, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float z = static_cast<float>(r / h), y = static_cast<float>(r % h);
      const float* u = disp + r * w * 3;
      const float* gr = g + r * w;
      float* out = du + r * w * 3;
      for (int64_t x = 0; x < w; ++x) {
        const float c[3] = {z + u[3 * x], y + u[3 * x + 1], static_cast<float>(x) + u[3 * x + 2]};
        if (std::isnan(c[0]) || std::isnan(c[1]) || std::isnan(c[2])) {
          out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = NAN;
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
        float v[2][2][2];
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b) {
            const float* row = image + (idx[0][a] * hi + idx[1][b]) * wi;
            v[a][b][0] = row[idx[2][0]];
            v[a][b][1] = row[idx[2][1]];
          }
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f;
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b) {
            d0 += wt[1][a] * wt[2][b] * (v[1][a][b] - v[0][a][b]);
            d1 += wt[0][a] * wt[2][b] * (v[a][1][b] - v[a][0][b]);
            d2 += wt[0][a] * wt[1][b] * (v[a][b][1] - v[a][b][0]);
          }
        const float gx = gr[x];
        out[3 * x] = gx * d0;
        out[3 * x + 1] = gx * d1;
        out[3 * x + 2] = gx * d2;
      }
    }
  });
}

ffi::Error WarpGradImpl(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> g,
                        ffi::Result<ffi::Buffer<ffi::F32>> du) {
  auto id = image.dimensions(), ud = disp.dimensions(), gd = g.dimensions(), od = du->dimensions();
  if (id.size() != 3 || ud.size() != 4 || ud[3] != 3 || gd.size() != 3 || od.size() != 4)
    return ffi::Error::InvalidArgument("warp grad: expected image (D, H, W), displacement (D, H, W, 3), g (D, H, W)");
  for (int k = 0; k < 3; ++k) {
    if (gd[k] != ud[k] || od[k] != ud[k])
      return ffi::Error::InvalidArgument("warp grad: cotangent or output differs from the displacement's grid");
  }
  if (od[3] != 3) return ffi::Error::InvalidArgument("warp grad: output must be (D, H, W, 3)");
  if (id[0] < 1 || id[1] < 1 || id[2] < 1) return ffi::Error::InvalidArgument("warp grad: empty image");
  WarpLinearGrad(image.typed_data(), id[0], id[1], id[2], disp.typed_data(), g.typed_data(), ud[0], ud[1], ud[2],
                 du->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdWarpGrad, WarpGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
