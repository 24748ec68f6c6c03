// The convolution's XLA FFI handlers: argument checks, the output buffer's huge-page hint, and the calls into the
// kernels. The kernels are 3-D convolutions for x86-64 CPUs with AVX2 + FMA (and AVX-512, AMX where the CPU
// has them).
//
// Why this exists: XLA's CPU backend runs 3^3 convolutions at ~15 GFLOP/s on the 2-core machines this
// project targets, and an im2col + dot formulation is bounded by the memory traffic of the 27x patch
// matrix. A register-blocked direct convolution reads each input voxel from cache and keeps the partial
// sums in registers, which is what oneDNN does for PyTorch.
//
// Stride-1 3^3 layers with output channels in multiples of 16 and at least 8 input channels run as Winograd
// F(2x2x2, 3x3x3) on AVX-512
// (conv_winograd_avx512.cc, winograd.h): 64 instead of 216 multiply-adds per 2x2x2 outputs and channel pair.
//
// Forward pass: each output row reads its KD x KH input rows in place (only the few columns at either end
// read a zero-padded copy); tiles of output columns x output channels keep their partial sums in
// registers; output rows are visited in bands that keep the input rows they share in the L2 cache.
//
// Layout: channels-last. Input x (B, D, H, W, Ci); weights (KD, KH, KW, Ci, CoP) with the output channels
// zero-padded to CoP, a multiple of 8; output (B, Do, Ho, Wo, Co). 2-D convolutions are passed as D = 1,
// KD = 1. Padding is explicit (low side); out-of-range taps read zeros, as in lax.conv_general_dilated.
//
// Three entry points:
//   crd_conv_fwd: y = act(conv(x, w) + b), act = LeakyReLU(slope) or identity.
//   crd_conv_wgrad: dw[k, ci, co] = sum_{b, o} x[b, o * s - p + k, ci] * dy[b, o, co].
//
// Files: conv_direct.cc (the forward driver), conv_direct_avx2.cc, conv_direct_avx512.cc, conv_amx.cc (tiles),
// conv_winograd_avx512.cc, conv_upcat.cc (the fused decoder step), conv_wgrad_avx2.cc, dispatch.cc (CPU features
// and settings), control_api.cc (the C functions crd_jax/ops/native.py calls); the warp is warp_cpu.cc and
// warp_grad_cpu.cc.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "conv_common.h"
#include "huge_pages.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace crd;  // NOLINT: the kernels' types and entry points

ffi::Error CheckRank(const ffi::AnyBuffer::Dimensions& d, size_t rank, const char* what) {
  if (d.size() != rank) return ffi::Error::InvalidArgument(std::string(what) + ": wrong rank");
  return ffi::Error::Success();
}

// Strides of at least 1 and paddings of at least 0: the kernels index the input from o * s - p without
// bounds checks beyond the zero-padded edge, so a negative padding would read before the buffer.
ffi::Error CheckGeometry(const Geometry& g) {
  if (g.sd < 1 || g.sh < 1 || g.sw < 1) return ffi::Error::InvalidArgument("strides must be at least 1");
  if (g.pd < 0 || g.ph < 0 || g.pw < 0) return ffi::Error::InvalidArgument("paddings must not be negative");
  return ffi::Error::Success();
}

// A fresh output buffer is an untouched anonymous mapping; its first writes fault in 4 KB pages (~13k faults,
// ~20% of a full-resolution 16-channel layer): the convolutions ask for huge pages first (huge_pages.h).

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sd, int64_t sh, int64_t sw, int64_t pd,
                       int64_t ph, int64_t pw, float slope, int64_t act, int64_t bf16) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank(xd, 5, "x"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "y"); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4], wd[4],
             wd[0], wd[1], wd[2], sd, sh, sw, pd, ph, pw};
  if (wd[3] != g.Ci || g.CoP % 8 != 0 || g.CoP < g.Co) return ffi::Error::InvalidArgument("weight shape");
  if (g.KD * g.KH > 64) return ffi::Error::InvalidArgument("kernel too large (KD * KH > 64)");
  if (auto e = CheckGeometry(g); e.failure()) return e;
  if (bf16 != 0 && !CpuHasBf16()) return ffi::Error::InvalidArgument("bf16 convolution needs AVX512-BF16");
  AdviseHugePagesOn(y->typed_data(), y->size_bytes());
  ConvForward(g, x.typed_data(), w.typed_data(), bias.typed_data(), slope, act != 0, y->typed_data(), bf16 != 0);
  return ffi::Error::Success();
}

ffi::Error ConvUpcatFwdImpl(ffi::Buffer<ffi::F32> low, ffi::Buffer<ffi::F32> skip, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t pd, int64_t ph,
                            int64_t pw, float slope, int64_t act, int64_t bf16) {
  auto ld = low.dimensions(), sd = skip.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank(ld, 5, "low"); e.failure()) return e;
  if (auto e = CheckRank(sd, 5, "skip"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "y"); e.failure()) return e;
  const int64_t ci = bf16 != 0 ? (ld[4] + sd[4] + 1) / 2 : ld[4] + sd[4];  // bf16: pairs of channels
  Geometry g{sd[0], sd[1], sd[2], sd[3], ci, yd[1], yd[2], yd[3], yd[4], wd[4],
             wd[0], wd[1], wd[2], 1, 1, 1, pd, ph, pw};
  const Upcat u{low.typed_data(), ld[1], ld[2], ld[3], ld[4], skip.typed_data(), sd[4]};
  if (ld[0] != sd[0] || sd[1] > 2 * ld[1] || sd[2] > 2 * ld[2] || sd[3] > 2 * ld[3])
    return ffi::Error::InvalidArgument("low and skip shapes do not match a x2 upsampling");
  if (g.Do != g.D - g.KD + 1 + 2 * pd || g.Ho != g.H - g.KH + 1 + 2 * ph || g.Wo != g.W - g.KW + 1 + 2 * pw)
    return ffi::Error::InvalidArgument("output shape");
  if (wd[3] != g.Ci || g.CoP % 8 != 0 || g.CoP < g.Co) return ffi::Error::InvalidArgument("weight shape");
  if (g.KD * g.KH > 64) return ffi::Error::InvalidArgument("kernel too large (KD * KH > 64)");
  if (auto e = CheckGeometry(g); e.failure()) return e;
  if (bf16 != 0 && !CpuHasBf16()) return ffi::Error::InvalidArgument("bf16 convolution needs AVX512-BF16");
  AdviseHugePagesOn(y->typed_data(), y->size_bytes());
  ConvUpcatForward(g, u, w.typed_data(), bias.typed_data(), slope, act != 0, y->typed_data(), bf16 != 0);
  return ffi::Error::Success();
}

ffi::Error ConvWgradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                         int64_t sd, int64_t sh, int64_t sw, int64_t pd, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (auto e = CheckRank(xd, 5, "x"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "dy"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "dw"); e.failure()) return e;
  if (yd[0] != xd[0]) return ffi::Error::InvalidArgument("weight gradient: dy's batch differs from x's");
  const int64_t co = yd[4];
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], co, (co + 7) / 8 * 8,
             wd[0], wd[1], wd[2], sd, sh, sw, pd, ph, pw};
  if (wd[3] != g.Ci || wd[4] != co) return ffi::Error::InvalidArgument("weight-gradient shape");
  if (auto e = CheckGeometry(g); e.failure()) return e;
  ConvWeightGrad(g, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

// pool(conv^T(dy)) of the decoder's upsampled channels: dy (B, D, H, W, Ci) with even sizes, wf the flipped,
// transposed 3^3 kernel (3, 3, 3, Ci, Co), padding 1; out (B, D/2, H/2, W/2, Co) holds each 2 x 2 x 2 block's sum
// (conv.py: _coarse_upsampled_grads). Winograd where it runs now (AVX-512 active, Winograd on, Co a multiple of 16,
// Ci <= 128: 27 of 64 products per tile); elsewhere, as when the ISA or Winograd was switched off after the program
// was compiled, the coarse grid's stride-2 correlation with 4^3 taps W'[j] = wf[j] + wf[j - 1] per axis (conv.py:
// coarse_tap_matrix) on the tiles of the active instruction set.
ffi::Error ConvPooledTImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> wf, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = dy.dimensions(), wd = wf.dimensions(), od = out->dimensions();
  if (auto e = CheckRank(xd, 5, "dy"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "w"); e.failure()) return e;
  if (auto e = CheckRank(od, 5, "out"); e.failure()) return e;
  const int64_t ci = xd[4], co = wd[4], cop = (co + 7) / 8 * 8;
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != 3 || wd[3] != ci) return ffi::Error::InvalidArgument("pooled: weight shape");
  if (xd[1] % 2 || xd[2] % 2 || xd[3] % 2 || od[0] != xd[0] || 2 * od[1] != xd[1] || 2 * od[2] != xd[2] ||
      2 * od[3] != xd[3] || od[4] != co)
    return ffi::Error::InvalidArgument("pooled: out must be (B, D/2, H/2, W/2, Co) of an even dy");
  if (out->element_count() == 0) return ffi::Error::Success();
  const bool winograd = WinogradSetting().load(std::memory_order_relaxed) != 0 && ActiveIsa() == kAvx512 &&
                        co % 16 == 0 && ci <= 128;  // 128: winograd.h kMaxChannels
  if (winograd) {
    const Geometry g{xd[0], xd[1], xd[2], xd[3], ci, xd[1], xd[2], xd[3], co, co, 3, 3, 3, 1, 1, 1, 1, 1, 1};
    winograd::WinogradPooledForward(g, dy.typed_data(), wf.typed_data(), out->typed_data());
    return ffi::Error::Success();
  }
  std::vector<float> wc(64 * ci * cop, 0.0f);  // (4, 4, 4, ci, cop)
  const float* w = wf.typed_data();
  for (int64_t j = 0; j < 64; ++j) {
    const int64_t jd = j / 16, jh = (j / 4) % 4, jw = j % 4;
    for (int64_t a = 0; a < 8; ++a) {
      const int64_t td = jd - a / 4, th = jh - (a / 2) % 2, tw = jw - a % 2;
      if (td < 0 || td > 2 || th < 0 || th > 2 || tw < 0 || tw > 2) continue;
      const float* src = w + ((td * 3 + th) * 3 + tw) * ci * co;
      for (int64_t i = 0; i < ci; ++i)
        for (int64_t o = 0; o < co; ++o) wc[(j * ci + i) * cop + o] += src[i * co + o];
    }
  }
  const std::vector<float> zero(cop, 0.0f);
  const Geometry g{xd[0], xd[1], xd[2], xd[3], ci, od[1], od[2], od[3], co, cop, 4, 4, 4, 2, 2, 2, 1, 1, 1};
  if (auto e = CheckGeometry(g); e.failure()) return e;
  ConvForward(g, dy.typed_data(), wc.data(), zero.data(), 0.0f, false, out->typed_data(), false);
  return ffi::Error::Success();
}

// The weight gradient of a decoder step conv(concat(up(low), skip)) (3^3, padding 1, stride 1; conv_upcat.cc's
// forward): low (B, D/2, H/2, W/2, Cl), skip (B, D, H, W, Cs), dy (B, D, H, W, Co) -> dw (3, 3, 3, Cl + Cs, Co), the
// concatenation never stored (conv.py: _upcat_weight_grad). Winograd where it runs now (AVX-512 active, the weight
// gradient's Winograd kernel not switched off, Cl a multiple of 16, Cl + Cs and Co at most 64:
// WinogradWeightGradUpcat); elsewhere, as when a setting changed after the program was compiled, the concatenation
// is built here and ConvWeightGrad takes it.
ffi::Error ConvWgradUpcatImpl(ffi::Buffer<ffi::F32> low, ffi::Buffer<ffi::F32> skip, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw) {
  auto ld = low.dimensions(), sd = skip.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (auto e = CheckRank(ld, 5, "low"); e.failure()) return e;
  if (auto e = CheckRank(sd, 5, "skip"); e.failure()) return e;
  if (auto e = CheckRank(yd, 5, "dy"); e.failure()) return e;
  if (auto e = CheckRank(wd, 5, "dw"); e.failure()) return e;
  const int64_t cl = ld[4], cs = sd[4], co = yd[4];
  for (int a = 0; a < 4; ++a) {
    if (sd[a] != yd[a] || (a > 0 && sd[a] != 2 * ld[a]) || (a == 0 && ld[0] != sd[0]))
      return ffi::Error::InvalidArgument("upcat weight gradient: skip and dy must be low's grid x2");
  }
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != 3 || wd[3] != cl + cs || wd[4] != co)
    return ffi::Error::InvalidArgument("upcat weight gradient: dw must be (3, 3, 3, Cl + Cs, Co)");
  const Geometry g{sd[0], sd[1], sd[2], sd[3], cl + cs, yd[1], yd[2], yd[3], co, (co + 7) / 8 * 8,
                   3, 3, 3, 1, 1, 1, 1, 1, 1};
  if (auto e = CheckGeometry(g); e.failure()) return e;
  const int setting = WgradSetting().load(std::memory_order_relaxed);
  if (setting != kWgradRows && setting != kWgradBlocked && WinogradWgradApplies(g) && cl % 16 == 0 &&
      dw->element_count() > 0 && sd[1] * sd[2] * sd[3] > 0) {
    winograd::WinogradWeightGradUpcat(g, low.typed_data(), cl, skip.typed_data(), dy.typed_data(), dw->typed_data());
    return ffi::Error::Success();
  }
  const int64_t voxels = sd[0] * sd[1] * sd[2] * sd[3];
  std::vector<float> x(voxels * (cl + cs));
  const float* lp = low.typed_data();
  const float* sp = skip.typed_data();
  for (int64_t v = 0; v < voxels; ++v) {
    int64_t r = v;
    const int64_t w = r % sd[3];
    r /= sd[3];
    const int64_t h = r % sd[2];
    r /= sd[2];
    const int64_t d = r % sd[1], b = r / sd[1];
    const float* src = lp + (((b * ld[1] + d / 2) * ld[2] + h / 2) * ld[3] + w / 2) * cl;
    std::copy(src, src + cl, x.data() + v * (cl + cs));
    std::copy(sp + v * cs, sp + (v + 1) * cs, x.data() + v * (cl + cs) + cl);
  }
  ConvWeightGrad(g, x.data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sd")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvUpcatFwd, ConvUpcatFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvWgrad, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sd")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pd")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvPooledT, ConvPooledTImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrdConvWgradUpcat, ConvWgradUpcatImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
