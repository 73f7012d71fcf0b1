// Large CPU output buffers that every call overwrites in full (the sparse weight gradient's rows),
// taken from mappings that earlier outputs handed back when they were freed. A fresh mapping costs
// a page fault and a kernel zero fill per page on first touch (fresh_zeros.h: 2 MiB pages help, the
// zeroing stays), which made writing a step's ~60 MiB of gradient rows cost more than computing
// them; a recycled one is already faulted in. At most kKeep mappings wait in the pool (in steady
// state the previous step's gradient comes back before the next one is made), so the resident
// memory is what the last outputs used. The contents are NOT zero: the caller writes every element.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace imi_softmax {

#if defined(__linux__)
class RecycledMappings {
 public:
  static RecycledMappings& instance() {
    static RecycledMappings* pool = new RecycledMappings();  // never destroyed: deleters may run at exit
    return *pool;
  }

  // [sizes] of options' dtype with uninitialized contents.
  at::Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kMinBytes) return at::empty(sizes, options);
    Block block{nullptr, 0, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        // big enough, and not so big that a small output pins a large mapping
        if (free_[i].capacity >= bytes && free_[i].capacity / 2 <= bytes) {
          block = free_[i];
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
      }
    }
    if (block.base == nullptr) {
      const size_t capacity = round_up(bytes + bytes / 8, kHugePage);  // room for the next call's size
      const size_t mapped = capacity + kHugePage;                     // room to start on a 2 MiB boundary
      void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) return at::empty(sizes, options);
      block = Block{base, mapped, capacity};
      madvise(data_of(block), capacity, MADV_HUGEPAGE);  // advisory: without THP it is a no-op
    }
    return at::from_blob(data_of(block), sizes, [block](void*) { RecycledMappings::instance().give(block); },
                         options);
  }

 private:
  struct Block {
    void* base;
    size_t mapped;
    size_t capacity;
  };
  static constexpr size_t kMinBytes = size_t(4) << 20;  // below this the allocator's blocks are fine
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kKeep = 2;

  static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }
  static void* data_of(const Block& b) {
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(b.base) + kHugePage - 1) & ~(kHugePage - 1));
  }

  void give(const Block& b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kKeep) {
        free_.push_back(b);
        return;
      }
    }
    munmap(b.base, b.mapped);
  }

  std::mutex mutex_;
  std::vector<Block> free_;
};

inline at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return RecycledMappings::instance().take(sizes, options);
}
#else
inline at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
#endif

}  // namespace imi_softmax
