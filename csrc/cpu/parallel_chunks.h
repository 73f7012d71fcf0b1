// Parallel loops that stay fast on a busy machine. at::parallel_for splits a range into one equal
// part per thread up front, so when another process keeps one thread off its core (a data-loader
// worker, a second job) the region waits for that thread's whole part. Here the threads of one
// region claim small chunks from a shared counter instead: a running thread takes over the work of
// one that is not running, and the region then waits only for the chunk a descheduled thread holds
// (and for that thread to reach the region's end). Work that fits in one chunk runs inline, without
// a parallel region. Which thread computes a row never changes what is computed: the results are
// those of a sequential loop.
//
// A thread that runs out of chunks then waits for the region's other threads in RegionArrivals:
// it spins for a few microseconds and then blocks (futex), instead of spinning in OpenMP's closing
// barrier for up to milliseconds (libgomp's default wait policy). On a busy machine the thread it
// waits for is often the one without a core; a blocked waiter frees its core for that thread at
// once, where a spinning one holds it until the scheduler preempts it. Everyone then reaches the
// OpenMP barrier together. (OMP_WAIT_POLICY=PASSIVE does this for every region of the process, torch's
// and MKL's included, but must be set before torch is imported; see README "Busy machines".
// IMI_REGION_WAIT=spin turns this off, for A/B timing.)
//
// (Helpers from torch's inter-op pool instead of the OpenMP team, with the caller waiting only for
// chunks in progress, measured no better: the OpenMP threads that spin after every torch op then
// compete with the helpers for the cores.)
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace imi_softmax {

class ChunkQueue {
 public:
  ChunkQueue(int64_t n, int64_t chunk) : n_(n), chunk_(std::max<int64_t>(chunk, 1)) {}
  // The next unclaimed chunk [begin, end); false when none is left.
  bool next(int64_t& begin, int64_t& end) {
    const int64_t b = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (b >= n_) return false;
    begin = b;
    end = std::min(n_, b + chunk_);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_, chunk_;
};

// Where the threads of one region wait for each other (header comment). Arrivals are counted in
// slots of at::parallel_for's range [0, threads): with OpenMP every thread of the team calls the
// region's function at most once, with its share of the slots, so the slots add up to `threads`
// exactly when every call has arrived, whatever number of threads OpenMP gave.
class RegionArrivals {
 public:
  explicit RegionArrivals(int64_t slots) : slots_(slots) {}
  void arrive_and_wait(int64_t my_slots) noexcept {
    int64_t now = arrived_.fetch_add(my_slots, std::memory_order_acq_rel) + my_slots;
    if (now >= slots_) {
      arrived_.notify_all();
      return;
    }
    for (int spin = 0; spin < kSpins; ++spin) {
      if (arrived_.load(std::memory_order_acquire) >= slots_) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    while ((now = arrived_.load(std::memory_order_acquire)) < slots_) arrived_.wait(now, std::memory_order_acquire);
  }

  // IMI_REGION_WAIT=spin: no waiting here (OpenMP's barrier alone), read once.
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("IMI_REGION_WAIT");
      return v == nullptr || std::strcmp(v, "spin") != 0;
    }();
    return on;
  }

 private:
  static constexpr int kSpins = 2000;  // a few microseconds of pause instructions
  std::atomic<int64_t> arrived_{0};
  const int64_t slots_;
};

// Runs body(queue) once on each thread of one parallel region (on the calling thread alone when
// [0, n) is a single chunk, with one thread, or inside another parallel region); body claims chunks
// until queue.next() returns false. Per-thread scratch is set up in body, before its claim loop.
template <typename Body>
void parallel_chunks(int64_t n, int64_t chunk, const Body& body) {
  ChunkQueue queue(n, chunk);
  const int64_t chunks = chunk > 0 ? (n + chunk - 1) / chunk : n;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    body(queue);
    return;
  }
#if AT_PARALLEL_OPENMP
  if (RegionArrivals::enabled()) {
    RegionArrivals arrivals(threads);
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      // arrives on the way out even if body throws, or the other threads would wait forever
      struct Arrive {
        RegionArrivals& arrivals;
        int64_t slots;
        ~Arrive() { arrivals.arrive_and_wait(slots); }
      } arrive{arrivals, e - b};
      body(queue);
    });
    return;
  }
#endif
  // (other backends may run two of these calls on one thread in turn: no waiting inside them)
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(queue); });
}

}  // namespace imi_softmax
