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

import struct
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
UNIFORM_SCALE_F32 = struct.unpack("f", struct.pack("f", UNIFORM_SCALE))[0]  # its float32 value, which kernels use
TWO_PI = 6.283185307179586


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int], rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; the round function of Triton's philox_impl.

    Vectorised for CPU: 12 in-place int64 ops per round on 6 rotating buffers (allocating a fresh tensor per op
    cost more than the arithmetic). The 32x32 -> 64-bit products never overflow an int64: with the constant
    taken as a_s = a - 2**32 (negative, |a_s| < 2**31), a_s * b fits, has the low 32 bits of a * b, and
    a * b >> 32 == (a_s * b >> 32) + b (arithmetic shift: floor division, exact for negative products).
    """
    c0, c1, c2, c3 = (torch.broadcast_to(c, counter[0].shape).clone() for c in counter)
    f1, f2 = torch.empty_like(c0), torch.empty_like(c0)
    k0, k1 = key
    for _ in range(rounds):
        _mulhilo(c2, PHILOX_ROUND_B - 2**32, hi=f1, lo=f2)
        f1 ^= c1
        f1 ^= k0
        _mulhilo(c0, PHILOX_ROUND_A - 2**32, hi=c2, lo=c1)  # c1, c2 were consumed above: reuse them
        c2 ^= c3
        c2 ^= k1
        c0, c1, c2, c3, f1, f2 = f1, f2, c2, c1, c0, c3
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _mulhilo(b: torch.Tensor, a_signed: int, *, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """hi, lo = the high and low 32-bit words of (a_signed + 2**32) * b, written into `hi` and `lo`."""
    torch.mul(b, a_signed, out=hi)
    torch.bitwise_and(hi, MASK32, out=lo)
    hi >>= 32
    hi += b


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale into [0, 1).

    For x >= 2**31 the int32 value is x - 2**32 and ~(x - 2**32) == x ^ 0xFFFFFFFF: one XOR with a mask
    taken from the top bit. Modifies x in place.
    """
    x ^= (x >> 31) * MASK32
    return x.to(torch.float32).mul_(UNIFORM_SCALE_F32)


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
