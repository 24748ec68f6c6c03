// Samples a 3-D volume at x + u(x) for every voxel x of a displacement field u, edge voxels repeated outside:
// jax.scipy.ndimage.map_coordinates(image, x + u, order, mode="nearest"), exposed to XLA as an FFI call.
//
// Why this exists: XLA's CPU backend runs map_coordinates as one gather per corner (eight for linear
// interpolation) over index arrays it materialises, which raised the peak memory of `crd-jax register` at
// OASIS size (~73 ms a warp on 2 cores, 45-52 ms here). Each output voxel reads its corners directly: no
// temporaries, one pass, rows split over the kernels' thread pool.
//
// Equal to map_coordinates: order 1 takes the lower corner floor(c), weights 1 - (c - floor c) and c - floor c,
// corners clamped to the volume, the eight products ((w0 * w1) * w2) * v summed in its order (axis 0's lower
// corner first); order 0 takes c rounded half away from zero (lax.round), clamped. Linear output is float32;
// nearest keeps the image's type (integer label maps are copied, never rounded through float).
//
// Layout: image (Di, Hi, Wi); displacement (D, H, W, 3) in voxels of the image; output (D, H, W).
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape3 {
  int64_t d, h, w;
};

inline int64_t Clamp(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// A coordinate limited to [-1, n] before it becomes an integer (out-of-range values clamp to the same corner,
// and the conversion stays defined); NaN stays NaN.
inline float Bounded(float c, int64_t n) {
  return c < -1.0f ? -1.0f : (c > static_cast<float>(n) ? static_cast<float>(n) : c);
}

// Calls voxel(c, i) for every output voxel i (row-major) with its sampling position c = x + u(x), float32
// as map_coordinates computes it; rows are split over the thread pool.
template <typename Voxel>
void ForEachVoxel(const Shape3& out, const float* disp, Voxel voxel) {
  crd::ParallelFor(out.d * out.h, crd::NumThreads(), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float d = static_cast<float>(r / out.h), h = static_cast<float>(r % out.h);
      const float* u = disp + r * out.w * 3;
      for (int64_t x = 0; x < out.w; ++x) {
        const float c[3] = {d + u[3 * x], h + u[3 * x + 1], static_cast<float>(x) + u[3 * x + 2]};
        voxel(c, r * out.w + x);
      }
    }
  });
}

void WarpLinear(const float* image, const Shape3& in, const float* disp, const Shape3& out, float* y) {
  const int64_t n[3] = {in.d, in.h, in.w};
  ForEachVoxel(out, disp, [&](const float* c, int64_t i) {
    if (std::isnan(c[0]) || std::isnan(c[1]) || std::isnan(c[2])) {
      y[i] = NAN;
      return;
    }
    int64_t idx[3][2];
    float wt[3][2];
    for (int k = 0; k < 3; ++k) {
      const float ck = Bounded(c[k], n[k]);
      const float lower = std::floor(ck);
      wt[k][1] = ck - lower;
      wt[k][0] = 1.0f - wt[k][1];
      const int64_t j = static_cast<int64_t>(lower);
      idx[k][0] = Clamp(j, n[k]);
      idx[k][1] = Clamp(j + 1, n[k]);
    }
    float sum = 0.0f;
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        const float* plane = image + (idx[0][a] * in.h + idx[1][b]) * in.w;
        const float wab = wt[0][a] * wt[1][b];
        for (int e = 0; e < 2; ++e) {
          const float term = (wab * wt[2][e]) * plane[idx[2][e]];
          sum = (a | b | e) ? sum + term : term;
        }
      }
    }
    y[i] = sum;
  });
}

template <typename T>
void WarpNearest(const T* image, const Shape3& in, const float* disp, const Shape3& out, T* y) {
  const int64_t n[3] = {in.d, in.h, in.w};
  ForEachVoxel(out, disp, [&](const float* c, int64_t i) {
    int64_t j[3];
    for (int k = 0; k < 3; ++k) {
      // NaN reads the first voxel, as XLA's float-to-int conversion followed by the clamp does
      j[k] = std::isnan(c[k]) ? 0 : Clamp(static_cast<int64_t>(std::round(Bounded(c[k], n[k]))), n[k]);
    }
    y[i] = image[(j[0] * in.h + j[1]) * in.w + j[2]];
  });
}

ffi::Error WarpImpl(ffi::AnyBuffer image, ffi::Buffer<ffi::F32> disp, ffi::Result<ffi::AnyBuffer> y, int64_t order) {
  auto id = image.dimensions(), ud = disp.dimensions(), yd = y->dimensions();
  if (id.size() != 3 || ud.size() != 4 || ud[3] != 3 || yd.size() != 3)
    return ffi::Error::InvalidArgument("warp: expected image (D, H, W), displacement (D, H, W, 3)");
  if (yd[0] != ud[0] || yd[1] != ud[1] || yd[2] != ud[2])
    return ffi::Error::InvalidArgument("warp: output shape differs from the displacement's grid");
  if (id[0] < 1 || id[1] < 1 || id[2] < 1) return ffi::Error::InvalidArgument("warp: empty image");
  const Shape3 in{id[0], id[1], id[2]}, out{ud[0], ud[1], ud[2]};
  const auto type = image.element_type();
  if (order == 1) {
    if (type != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("warp: linear interpolation takes and gives float32");
    WarpLinear(static_cast<const float*>(image.untyped_data()), in, disp.typed_data(), out,
               static_cast<float*>(y->untyped_data()));
    return ffi::Error::Success();
  }
  if (order != 0) return ffi::Error::InvalidArgument("warp: order must be 0 or 1");
  if (y->element_type() != type) return ffi::Error::InvalidArgument("warp: nearest keeps the image's type");
  // Nearest neighbour only copies values: each element is moved as the unsigned word of its width (float32
  // bits included), so one instantiation per width serves every type of that width.
  const auto copy = [&](auto word) {
    using T = decltype(word);
    WarpNearest(static_cast<const T*>(image.untyped_data()), in, disp.typed_data(), out,
                static_cast<T*>(y->untyped_data()));
    return ffi::Error::Success();
  };
  switch (type) {
    case ffi::DataType::S8:
    case ffi::DataType::U8:
      return copy(uint8_t{});
    case ffi::DataType::S16:
    case ffi::DataType::U16:
      return copy(uint16_t{});
    case ffi::DataType::F32:
    case ffi::DataType::S32:
    case ffi::DataType::U32:
      return copy(uint32_t{});
    default:
      return ffi::Error::InvalidArgument("warp: nearest takes float32 or 8/16/32-bit integers");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdWarp, WarpImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("order"));
