// Transparent huge pages for the fresh output buffers of the convolutions (ffi_glue.cc) and the loss kernels
// (ncc_cpu.cc, warp_linear_cpu.cc, upsample_linear_cpu.cc). Where glibc's malloc already advises huge pages on
// what it maps (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: training commands, crd_jax/allocator.py) this repeats it;
// elsewhere (the library, register) it is what gets a full-resolution output its 2 MB pages.
//
// Why: XLA hands a kernel output buffers that are fresh anonymous mappings on every call; their first writes
// fault in 4 KB pages. At 128^3 the loss's outputs (warped image, its derivative, NCC's coefficients and gradient)
// are ~64 MB a step; the advice (2 MB pages on the 2 MB-aligned part) took the registration loss + field
// upsampling from 22,846 to 11,643 faults and 47 to 31 ms of system time a call (2 cores, shared machine).
// A hint only: ignored where THP is off; CRD_JAX_HUGEPAGES=0 turns it off (dispatch.cc).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace crd {

bool HugePagesWanted();  // dispatch.cc

inline void AdviseHugePagesOn(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge || !HugePagesWanted()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace crd
