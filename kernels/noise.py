"""Counter-based Gaussian noise: the determinism contract of docs/ARCHITECTURE.md.

Element j of global sample i under (seed, stream) is a pure function of those four numbers:
Philox4x32-10 with key (seed lo, seed hi) and counter (j // 4, sample_id, stream, 0); the four
32-bit outputs become uniforms with Triton's `uint_to_uniform_float` and normals with Triton's
Box-Muller (`pair_uniform_to_normal`); element j takes output j % 4. So every one of the four
outputs of a Philox call is used, and the noise never depends on batch, rank or block size.

`randn` is the plain-torch reference (int64 arithmetic emulating uint32). `normal4` / `noise_tile`
are the same generator as `@triton.jit` device functions, used inside the fused kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
# Philox4x32 constants, exactly those of triton/language/random.py (philox_impl, uint32 branch).
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit inputs: the largest value with INT_MAX * scale < 1.
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586


def _umul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant a and uint32 values b (held in int64).

    b is split into 16-bit halves so that no intermediate overflows a signed int64.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return high & MASK32, low


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int], rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; the round function of Triton's philox_impl."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _umul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale into [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's Box-Muller transform, in float32."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def seed_key(seed: int) -> tuple[int, int]:
    """Philox key (low word, high word) of a 64-bit run seed."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed & MASK32, (seed >> 32) & MASK32


def check_stream(stream: int) -> int:
    if not isinstance(stream, int) or isinstance(stream, bool) or not 0 <= stream < 2**32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    return stream


def randn(seed: int, stream: int, sample_ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Counter-based N(0, 1) noise, float32, shaped (len(sample_ids), *shape), on sample_ids' device.

    Row r holds the noise of global sample `sample_ids[r]`: the same values whatever else is in the batch.
    """
    key = seed_key(seed)
    check_stream(stream)
    sample_ids = torch.as_tensor(sample_ids)
    if sample_ids.dim() != 1 or sample_ids.dtype.is_floating_point:
        raise ValueError(f"sample_ids must be a 1-d integer tensor, got {sample_ids.dtype} {tuple(sample_ids.shape)}")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    device = sample_ids.device
    groups = (numel + 3) // 4  # one Philox call serves 4 consecutive elements
    c0 = torch.arange(groups, dtype=torch.int64, device=device).unsqueeze(0)
    c1 = (sample_ids.to(torch.int64) & MASK32).unsqueeze(1)
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c2 = torch.full_like(c0, stream)
    r0, r1, r2, r3 = philox4x32((c0, c1, c2, torch.zeros_like(c0)), key)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    interleaved = torch.stack((n0, n1, n2, n3), dim=-1).reshape(len(sample_ids), groups * 4)
    return interleaved[:, :numel].reshape(len(sample_ids), *shape)


# ---------------------------------------------------------------------------------------------
# The same generator inside Triton kernels.


@triton.jit
def normal4(seed, group, sample_id, stream):
    """Four N(0, 1) blocks for Philox counters (group, sample_id, stream, 0); `group` is a uint32 block."""
    zero = group * 0
    r0, r1, r2, r3 = tl.philox(seed, group, zero + sample_id, zero + stream, zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def noise_tile(seed, stream, sample_id, group):
    """Noise for a (GROUPS, 4) tile: element (g, l) is element j = 4 group[g] + l of the sample.

    `group` is 1-d (GROUPS,): Philox runs once per group with one group per thread slot. (Computing it on
    a (GROUPS, 1) column broadcast into a (GROUPS, 4) layout ran Philox once per ELEMENT on the GPU, 4x the
    integer work.) The four outputs are interleaved with joins: [g, a, b] = n[2a + b].
    """
    n0, n1, n2, n3 = normal4(seed, group.to(tl.uint32), sample_id, stream)
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (group.shape[0], 4))
