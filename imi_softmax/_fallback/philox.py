"""Philox4x32-10 on int64 tensors (each 32-bit word held in an int64), bit-equal to imi::philox10.

torch has no uint32/uint64 arithmetic on every backend, so 32x32-bit products are split into
16-bit limbs: every partial product and sum fits in a signed 64-bit integer.
"""
from typing import Tuple

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def mul32(a: Tensor, b) -> Tuple[Tensor, Tensor]:
    """Full product of 32-bit words a and b (tensors or ints in [0, 2^32)): (high word, low word)."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    low = a0 * b0
    mid = a1 * b0 + a0 * b1 + (low >> 16)  # < 2^34: no overflow
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    hi = a1 * b1 + (mid >> 16)
    return hi, lo


def philox10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ten rounds on counters (c0..c3, broadcastable int64 words) with key = the 64-bit seed."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi0, lo0 = mul32(c0, _M0)
        hi1, lo1 = mul32(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
    return c0, c1, c2, c3


def draw_words(seed: int, offset: int, rows: int, draws: int, device=None) -> Tuple[Tensor, ...]:
    """Words w0..w3 [rows, draws] of CONTRACT.md section 1: counter (c, b), c = offset / 4 + j."""
    seed &= (1 << 64) - 1
    c = torch.arange(draws, dtype=torch.int64, device=device) + (offset // 4)
    b = torch.arange(rows, dtype=torch.int64, device=device)
    z = torch.zeros(rows, draws, dtype=torch.int64, device=device)
    return philox10(z + (c & MASK32), z + (c >> 32), z + (b & MASK32)[:, None], z + (b >> 32)[:, None], seed)


def uniform24(w: Tensor) -> Tensor:
    """24 random bits of w -> an exactly representable float32 in [0, 1)."""
    return (w >> 8).to(torch.float32) * (1.0 / 16777216.0)


def slot_and_accept(w2: Tensor, w3: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """slot = (r * count) >> 64 and u_acc = float(((r * count) mod 2^64) >> 40) * 2^-24, r = w2:w3.

    The 128-bit product is assembled from four 32x32-bit limb products (count < 2^63).
    """
    ch, cl = count >> 32, count & MASK32
    h0, l0 = mul32(w3, cl)
    h1, l1 = mul32(w3, ch)
    h2, l2 = mul32(w2, cl)
    h3, l3 = mul32(w2, ch)
    del l0  # bits 0..31 of the product: below the 24 bits u_acc keeps
    s1 = h0 + l1 + l2
    s2 = h1 + h2 + l3 + (s1 >> 32)
    slot = ((h3 + (s2 >> 32)) << 32) | (s2 & MASK32)
    u_acc = uniform24(s1 & MASK32)
    return slot, u_acc
