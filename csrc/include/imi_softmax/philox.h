// Counter-based RNG (Philox4x32-10, Salmon et al. 2011). Keyed by a seed and indexed by
// (draw, query), so every draw is independent of thread scheduling: the CPU loops and the CUDA
// kernels produce the same samples from the same (seed, offset). The mapping of (seed, offset,
// query, draw) to Philox blocks is CONTRACT.md section 1.
#pragma once

#include "common.h"

namespace imi {

IMI_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The ten Philox rounds on counter ctr with key (k0, k1), in place.
IMI_HD_FLATTEN void philox10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, ctr[0]);
    const uint32_t lo0 = 0xD2511F53u * ctr[0];
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, ctr[2]);
    const uint32_t lo1 = 0xCD9E8D57u * ctr[2];
    ctr[0] = hi1 ^ ctr[1] ^ k0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ ctr[3] ^ k1;
    ctr[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// 24 random bits -> an exactly representable float in [0, 1).
IMI_HD float uniform24(uint32_t bits) { return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f); }

// The Philox counter of draw `draw` in a call at `offset`. offset counts 32-bit outputs per query
// row, as torch's philox_cuda_state(increment) does per thread (the query row plays the thread):
// one draw consumes one 128-bit block = 4 outputs, so a call of M draws reserves 4 * M and starts
// at block offset / 4 (callers keep offset % 4 == 0).
IMI_HD uint64_t philox_block(uint64_t offset, uint64_t draw) { return offset / 4 + draw; }

struct PhiloxWords {
  uint32_t w[4];
};

// The four 32-bit words of draw `draw` of query `query` (CONTRACT: key = seed, counter =
// (block, query)). w0, w1: the stage-1 and stage-2 uniforms (uniform24); w2, w3: the 64 random
// bits of the within-cell slot (random64).
IMI_HD_FLATTEN PhiloxWords philox_draw(uint64_t seed, uint64_t offset, uint64_t query, uint64_t draw) {
  const uint64_t c = philox_block(offset, draw);
  PhiloxWords out;
  out.w[0] = static_cast<uint32_t>(c);
  out.w[1] = static_cast<uint32_t>(c >> 32);
  out.w[2] = static_cast<uint32_t>(query);
  out.w[3] = static_cast<uint32_t>(query >> 32);
  philox10(out.w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return out;
}

IMI_HD uint64_t random64(uint32_t w2, uint32_t w3) { return (static_cast<uint64_t>(w2) << 32) | w3; }

}  // namespace imi
