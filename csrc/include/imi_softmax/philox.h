// Counter-based RNG (Philox4x32-10, Salmon et al. 2011). Keyed by a seed and indexed by
// (draw, query), so every draw is independent of thread scheduling: the CPU loops and the CUDA
// kernels produce the same samples from the same (seed, offset).
#pragma once

#include "common.h"

namespace imi {

IMI_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

struct Uniform4 {
  float v[4];
};

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

// Four uniforms in [0, 1) for draw `draw` of query `query`. `offset` shifts the draw counter so
// that consecutive calls with the same seed (CUDA Philox state) never reuse a counter.
IMI_HD_FLATTEN Uniform4 philox_uniform4(uint64_t seed, uint64_t offset, uint64_t query, uint64_t draw) {
  const uint64_t c = draw + offset;
  uint32_t ctr[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                     static_cast<uint32_t>(query), static_cast<uint32_t>(query >> 32)};
  philox10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  Uniform4 u;
  for (int i = 0; i < 4; ++i) u.v[i] = uniform24(ctr[i]);
  return u;
}

}  // namespace imi
