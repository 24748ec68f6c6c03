// The C functions crd_jax/ops/native.py calls with ctypes: threads, the instruction set and engines in use
// (and setters, which tests and benchmarks use to compare paths in one process), the Winograd dispatch count, the
// bfloat16 rate probe, and what the library was built from.
#include <cstdint>

#include "conv_common.h"
#include "parallel.h"

using namespace crd;  // NOLINT: the settings of dispatch.cc

extern "C" int crd_num_threads() { return NumThreads(); }

extern "C" int crd_isa() { return ActiveIsa(); }

// Selects the forward kernel's vector width (0: AVX2, 1: AVX-512); returns the width now in use (AVX-512 is
// refused where the CPU lacks it). For tests and benchmarks, which compare both paths in one process.
extern "C" int crd_set_isa(int isa) {
  IsaSetting().store(isa == kAvx512 && CpuHasAvx512() ? kAvx512 : kAvx2);
  return ActiveIsa();
}

// Turns the Winograd path of the stride-1 3^3 layers on (1) or off (0); returns the setting now in force.
extern "C" int crd_set_winograd(int on) {
  WinogradSetting().store(on != 0 ? 1 : 0);
  return WinogradSetting().load();
}

// The fewest input channels of a layer that runs as Winograd (default 8; 1: wherever the path applies); returns the
// value now in force. For tests and benchmarks, which compare the two paths on layers of few channels.
extern "C" int crd_set_winograd_min_input_channels(int channels) {
  WinogradMinInputChannels().store(channels < 1 ? 1 : channels);
  return WinogradMinInputChannels().load();
}

extern "C" int crd_winograd_min_input_channels() { return WinogradMinInputChannels().load(); }

// Selects the weight-gradient kernel (0: the earlier AVX2 "rows" kernel, 1: the blocked one, 2: Winograd wherever it
// applies, 3: auto); returns the one now in use. For tests and benchmarks, which compare them in one process.
extern "C" int crd_set_wgrad(int kernel) {
  WgradSetting().store(kernel >= kWgradRows && kernel <= kWgradAuto ? kernel : kWgradAuto);
  return WgradSetting().load();
}

extern "C" int64_t crd_winograd_wgrad_calls() { return WinogradWgradCalls().load(); }

extern "C" int crd_wgrad() { return WgradSetting().load(); }

extern "C" int crd_winograd() { return WinogradSetting().load(); }

extern "C" int64_t crd_winograd_calls() { return WinogradCalls().load(); }

extern "C" int crd_has_bf16() { return CpuHasBf16(); }

// Multiply-adds per second of the bfloat16 engine in use over float32 FMAs on this CPU, measured on the calling
// thread (~20 ms); 0 without AVX512-BF16. VDPBF16PS: up to 2 where it issues as often as VFMADD, 0.50 measured
// on an Intel Sapphire Rapids-class Xeon; AMX: ~16 on the same Xeon.
extern "C" double crd_bf16_speedup() {
  if (!CpuHasBf16()) return 0.0;
  return ActiveBf16Engine() == kBf16Amx ? amx::AmxMulAddSpeedup() : avx512::Bf16MulAddSpeedup();
}

extern "C" int crd_bf16_engine() { return ActiveBf16Engine(); }

// Selects the engine of the bf16 tiles (0: VDPBF16PS, 1: AMX); returns the one now in use (AMX is refused where
// the CPU or the kernel lacks it). For tests and benchmarks, which compare both in one process.
extern "C" int crd_set_bf16_engine(int engine) {
  Bf16EngineSetting().store(engine == kBf16Amx && CpuHasAmxBf16() ? kBf16Amx : kBf16Avx512);
  return ActiveBf16Engine();
}

extern "C" int crd_cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// What this library was built from (CMakeLists.txt defines both for this file only): the jaxlib whose XLA FFI
// headers it was compiled against (XLA checks the FFI version at call time, so crd_jax/ops/native.py refuses a
// library built for another jaxlib), and a hash of the kernel's sources (an edited kernel means a stale build).
#ifndef CRD_JAXLIB_VERSION
#define CRD_JAXLIB_VERSION ""
#endif
#ifndef CRD_SOURCE_HASH
#define CRD_SOURCE_HASH ""
#endif
extern "C" const char* crd_built_for_jaxlib() { return CRD_JAXLIB_VERSION; }
extern "C" const char* crd_source_hash() { return CRD_SOURCE_HASH; }
