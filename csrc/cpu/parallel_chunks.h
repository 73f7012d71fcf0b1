// Parallel loops that stay fast on a busy machine. at::parallel_for splits a range into one equal
// part per thread up front, so when another process keeps one thread off its core (a data-loader
// worker, a second job) the region waits for that thread's whole part. Here the threads of one
// region claim small chunks from a shared counter instead: a running thread takes over the work of
// one that is not running, and the region then waits only for the chunk a descheduled thread holds
// (and for that thread to reach the region's end). Work that fits in one chunk runs inline, without
// a parallel region. Which thread computes a row never changes what is computed: the results are
// those of a sequential loop.
//
// (Helpers from torch's inter-op pool instead of the OpenMP team, with the caller waiting only for
// chunks in progress, measured no better: the OpenMP threads that spin after every torch op then
// compete with the helpers for the cores. A pool of our own threads that the caller never waits for
// unless they are inside a chunk, sleeping on a futex after a short spin, measured no better again
// beside a busy process, with the step's glue on one thread, and slower on a quiet machine: torch's
// OpenMP worker, spinning after any parallel torch op, takes the helper's core. What helped is
// keeping torch's small ops of a step out of OpenMP altogether: serial_glue.h. OMP_WAIT_POLICY=PASSIVE
// helps most on a busy machine, see README "Busy machines".)
#pragma once

#include <ATen/Parallel.h>

#include "serial_glue.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

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

// Runs body(queue) once on each thread of one parallel region (on the calling thread alone when
// [0, n) is a single chunk, with one thread, or inside another parallel region; with every thread of
// kernel_threads() while the calling thread's glue is serial); body claims chunks
// until queue.next() returns false. Per-thread scratch is set up in body, before its claim loop, so
// an empty range runs no body at all: its scratch may be sized by another argument (midx_sample's
// by num_samples, which for B = 0 could be 2^31 draws).
template <typename Body>
void parallel_chunks(int64_t n, int64_t chunk, const Body& body) {
  if (n <= 0) return;
  ChunkQueue queue(n, chunk);
  const int64_t chunks = chunk > 0 ? (n + chunk - 1) / chunk : n;
  const int64_t threads = std::min<int64_t>(kernel_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    body(queue);
    return;
  }
  KernelThreadsScope all_threads;  // every thread even while the step's glue runs on one (serial_glue.h)
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(queue); });
}

}  // namespace imi_softmax
