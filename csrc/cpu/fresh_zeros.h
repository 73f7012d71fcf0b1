// Large zero-filled CPU tensors straight from the kernel. Anonymous mmap memory is already zero,
// so the fill pass of at::zeros (a full write of, e.g., a 488 MiB dense weight gradient every
// step) is skipped; MADV_HUGEPAGE asks for 2 MiB pages, so first touch costs ~250 page faults
// instead of ~125,000 (also why outputs that are fully written anyway come from here). Small sizes
// and non-Linux builds use at::zeros.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace imi_softmax {

// huge_pages = false leaves the mapping to the kernel's default (4 KiB pages where transparent huge
// pages are "madvise"): no fault of it can stall in synchronous compaction (update_cells).
inline at::Tensor fresh_zeros(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge_pages = true) {
#if defined(__linux__)
  constexpr size_t kMinBytes = size_t(16) << 20;  // below this the fill is cheap
  constexpr size_t kHugePage = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes >= kMinBytes) {
    const size_t mapped = bytes + kHugePage;  // room to start on a 2 MiB boundary
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t start = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1);
      void* data = reinterpret_cast<void*>(start);
      if (huge_pages) madvise(data, bytes, MADV_HUGEPAGE);  // advisory: without THP it is a no-op
      return at::from_blob(data, sizes, [base, mapped](void*) { munmap(base, mapped); }, options);
    }
  }
#endif
  return at::zeros(sizes, options);
}

}  // namespace imi_softmax
