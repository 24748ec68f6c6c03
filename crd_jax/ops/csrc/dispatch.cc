// What the process runs: the CPU's instruction sets (cpuid) and the choices of the environment and of the control
// API (control_api.cc), read once. Compiled with the baseline flags: it decides whether the AVX-512 and AMX files
// may run at all.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "conv_common.h"

namespace crd {

bool CpuHasBf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}

bool CpuHasAvx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"); }

std::atomic<int>& IsaSetting() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("CRD_JAX_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return static_cast<int>(kAvx2);
    return static_cast<int>(CpuHasAvx512() ? kAvx512 : kAvx2);
  }()};
  return isa;
}

int ActiveIsa() { return IsaSetting().load(std::memory_order_relaxed); }

namespace {
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;
}  // namespace

// Linux hands out the AMX tile registers only after the process asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool CpuHasAmxBf16() {
  if (!amx::Compiled()) return false;
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (!tile || !bf16 || !CpuHasBf16()) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

std::atomic<int>& Bf16EngineSetting() {
  static std::atomic<int> engine{[] {
    const char* env = std::getenv("CRD_JAX_BF16_ENGINE");
    if (env != nullptr && std::strcmp(env, "avx512") == 0) return static_cast<int>(kBf16Avx512);
    return static_cast<int>(CpuHasAmxBf16() ? kBf16Amx : kBf16Avx512);
  }()};
  return engine;
}

int ActiveBf16Engine() { return Bf16EngineSetting().load(std::memory_order_relaxed); }

// --- Winograd F(2x2x2, 3x3x3) for the stride-1 3^3 layers (conv_winograd_avx512.cc, winograd.h) -------------
//
// On by default where it applies (AVX-512, float32, 3^3 kernel, stride 1, padding 1, output channels a multiple
// of 16); CRD_JAX_WINOGRAD=0 or crd_set_winograd(0) keeps the direct kernel (for comparisons and tests).
std::atomic<int>& WinogradSetting() {
  static std::atomic<int> on{[] {
    const char* env = std::getenv("CRD_JAX_WINOGRAD");
    return env != nullptr && std::strcmp(env, "0") == 0 ? 0 : 1;
  }()};
  return on;
}

// The fewest input channels a layer needs for the Winograd path (CRD_JAX_WINOGRAD_MIN_CHANNELS at start-up, then
// crd_set_winograd_min_input_channels): with fewer, the tile transforms outweigh the saved multiply-adds
// (benchmarks/winograd_channels.py times both paths by channel count; the flow head's input gradient, 3 -> 16
// channels, falls below). The forward and fused-decoder passes follow it here, at run time; the pooled input
// gradient of the decoder's upsampled channels (ffi_glue.cc: ConvPooledT) follows it where its call is chosen,
// when the gradient is traced (conv.py: _pooled_winograd_applies).
std::atomic<int>& WinogradMinInputChannels() {
  static std::atomic<int> channels{[] {
    const char* env = std::getenv("CRD_JAX_WINOGRAD_MIN_CHANNELS");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v > 0 ? v : 8;
  }()};
  return channels;
}

// The weight gradient: "auto" by default (conv_common.h); CRD_JAX_WGRAD=rows|blocked|winograd or crd_set_wgrad picks one.
std::atomic<int>& WgradSetting() {
  static std::atomic<int> kernel{[] {
    const char* env = std::getenv("CRD_JAX_WGRAD");
    if (env == nullptr) return static_cast<int>(kWgradAuto);
    if (std::strcmp(env, "rows") == 0) return static_cast<int>(kWgradRows);
    if (std::strcmp(env, "blocked") == 0) return static_cast<int>(kWgradBlocked);
    if (std::strcmp(env, "winograd") == 0) return static_cast<int>(kWgradWinograd);
    if (std::strcmp(env, "auto") == 0) return static_cast<int>(kWgradAuto);
    // an unknown value (crd_jax.ops.native warns about it) keeps the direct kernel: whoever set the variable meant
    // to choose, most likely away from the default
    return static_cast<int>(kWgradBlocked);
  }()};
  return kernel;
}

std::atomic<int64_t>& WinogradWgradCalls() {  // weight gradients that took the Winograd path (tests check the dispatch)
  static std::atomic<int64_t> calls{0};
  return calls;
}

std::atomic<int64_t>& WinogradCalls() {  // convolutions that took the Winograd path (tests check the dispatch)
  static std::atomic<int64_t> calls{0};
  return calls;
}

// A fresh output buffer is an untouched anonymous mapping; its first writes fault in 4 KB pages (ffi_glue.cc asks
// for transparent huge pages first); CRD_JAX_HUGEPAGES=0 turns that off.
bool HugePagesWanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("CRD_JAX_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}

}  // namespace crd
