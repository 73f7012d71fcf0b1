// The row loop of the CPU loss ops: each query row's ids are checked just before the row reads weight
// rows with them; a bad row is skipped (its outputs filled by the caller's bad_row) and the smallest bad
// flat position is recorded, so the op raises after the loop, never reading out of bounds inside it.
#pragma once

#include <cstdint>

#include "imi_softmax/index_check.h"
#include "parallel_chunks.h"

namespace imi_softmax {

struct NoScratch {};  // for rows that need no per-thread scratch

// Runs row(b, scratch) for b in [0, B), rows claimed in chunks of 4 by the threads (tens of us a row:
// hundreds of random weight rows; parallel_chunks.h), each thread with its own copy of scratch_init.
// first_bad_column(b) returns the row's first bad column or -1; for a bad row, bad_row(b) runs instead
// and b * width + column goes to *first_bad (imi::record_bad_position).
template <typename Scratch, typename FirstBadColumn, typename BadRow, typename Row>
void for_each_checked_row(int64_t B, int64_t width, int64_t* first_bad, const Scratch& scratch_init,
                          const FirstBadColumn& first_bad_column, const BadRow& bad_row, const Row& row) {
  parallel_chunks(B, 4, [&](ChunkQueue& queue) {
    Scratch scratch = scratch_init;
    for (int64_t b0, b1; queue.next(b0, b1);)
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t bad = first_bad_column(b);
        if (bad >= 0) {
          imi::record_bad_position(first_bad, b * width + bad);
          bad_row(b);
          continue;
        }
        row(b, scratch);
      }
  });
}

}  // namespace imi_softmax
