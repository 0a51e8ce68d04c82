"""Counter-based Gaussian noise: the determinism contract of docs/ARCHITECTURE.md.

Element j of global sample i under (seed, stream) is a pure function of those four numbers:
Philox4x32-10 with key (seed lo, seed hi) and counter (j // 4, sample_id, stream, 0); the four
32-bit outputs become uniforms with Triton's `uint_to_uniform_float` and normals with Triton's
Box-Muller (`pair_uniform_to_normal`); element j takes output j % 4. So every one of the four
outputs of a Philox call is used, and the noise never depends on batch, rank or block size.

`randn` is the CPU reference: Philox in C (`kernels/philox.c`, built at first use) or, without a compiler, in
numpy on uint64 arrays of uint32 words (the same bits); Box-Muller in torch float32.
`normal4` / `noise_tile` are the same generator as `@triton.jit` device functions, used inside the fused kernels.
"""
from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import native

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
TWO_PI_F32 = struct.unpack("f", struct.pack("f", TWO_PI))[0]


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int], rounds: int = PHILOX_ROUNDS):
    """Philox4x32 of uint32 counter words held in integer tensors; returns the four words as int64 tensors."""
    words = [np.array(np.broadcast_to(torch.as_tensor(c).cpu().numpy(), tuple(counter[0].shape)), dtype=np.uint64)
             .reshape(-1) for c in counter]
    _philox_rounds(words, key, rounds)
    return tuple(torch.from_numpy(w.astype(np.int64)).reshape(counter[0].shape) for w in words)


def _philox_rounds(words: list[np.ndarray], key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> None:
    """The round function of Triton's philox_impl, in place on four contiguous uint64 arrays of uint32 values.

    numpy rather than torch: its uint64 multiply of two uint32 values is the exact 32x32 -> 64-bit product (no
    signed-overflow workaround), and 10 contiguous in-place passes a round. (uint32 words with the high and
    low words read as strided uint32 views of the product measured ~10% slower.)
    """
    c0, c1, c2, c3 = words
    prod_a, prod_b = np.empty_like(c0), np.empty_like(c0)
    k0, k1 = key
    for _ in range(rounds):
        np.multiply(c2, np.uint64(PHILOX_ROUND_B), out=prod_b)
        np.multiply(c0, np.uint64(PHILOX_ROUND_A), out=prod_a)
        np.right_shift(prod_b, np.uint64(32), out=c0)
        c0 ^= c1
        c0 ^= np.uint64(k0)
        np.right_shift(prod_a, np.uint64(32), out=c2)
        c2 ^= c3
        c2 ^= np.uint64(k1)
        np.bitwise_and(prod_b, np.uint64(MASK32), out=c1)
        np.bitwise_and(prod_a, np.uint64(MASK32), out=c3)
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32


def uint_to_uniform_float(x: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float of uint32 values `x` into float32 `out`: bitcast to int32, fold
    negatives with ~x (x ^ (x >> 31) with an arithmetic shift), scale into [0, 1)."""
    signed = x.astype(np.uint32).view(np.int32)
    np.bitwise_xor(signed, signed >> 31, out=signed)
    out.copy_(torch.from_numpy(signed))  # int32 -> float32, rounded to nearest like the kernels' cast
    return out.mul_(UNIFORM_SCALE_F32)


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's Box-Muller transform, in float32: the readable definition (`randn` runs the same ops in place)."""
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


# Philox groups per pass of `randn`: the working set stays in the L2 cache between the passes (Box-Muller's
# ~10 over 4 float32 planes, 256 KB; the numpy Philox's ~120 over 6 uint64 arrays, ~0.8 MB). Measured with the
# numpy Philox (randn, 65536 groups): 4096 and 8192 groups slower (per-pass overhead dominates), 32768 no faster.
CHUNK_GROUPS = 16384


def randn(seed: int, stream: int, sample_ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Counter-based N(0, 1) noise, float32, shaped (len(sample_ids), *shape), on sample_ids' device.

    Row r holds the noise of global sample `sample_ids[r]`: the same values whatever else is in the batch.
    Computed on the CPU (the kernels draw it on the GPU themselves) in chunks of CHUNK_GROUPS Philox groups:
    uniforms from the C Philox (`kernels.native`) or, without a C compiler, the numpy one; then Box-Muller.
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
    rows = len(sample_ids)
    groups = (numel + 3) // 4  # one Philox call serves 4 consecutive elements
    ids = np.ascontiguousarray((sample_ids.cpu().numpy().astype(np.int64) & MASK32).astype(np.uint32))
    out = torch.empty(rows * groups, 4, dtype=torch.float32)
    for start in range(0, rows * groups, CHUNK_GROUPS):
        stop = min(start + CHUNK_GROUPS, rows * groups)
        uniforms = torch.empty(4, stop - start, dtype=torch.float32)
        philox_uniforms(ids, groups, start, stop, stream, key, uniforms)
        _box_muller_into(uniforms, out[start:stop])
    return out.reshape(rows, groups * 4)[:, :numel].reshape(rows, *shape).to(sample_ids.device)


def philox_uniforms(ids: np.ndarray, groups: int, start: int, stop: int, stream: int, key: tuple[int, int],
                    out: torch.Tensor) -> None:
    """out[l, i - start] = uniform of Philox output l for counter (i % groups, ids[i // groups], stream, 0), for
    i in [start, stop): the C loop when it could be built, else the same in numpy."""
    compiled = native.philox_uniforms()
    if compiled is not None:
        compiled(ids.ctypes.data, groups, start, stop, stream, key[0], key[1], out.data_ptr())
        return
    index = np.arange(start, stop, dtype=np.uint64)
    words = [index % np.uint64(groups), ids[index // np.uint64(groups)].astype(np.uint64),
             np.full(stop - start, stream, np.uint64), np.zeros(stop - start, np.uint64)]
    _philox_rounds(words, key)
    for lane, word in enumerate(words):
        uint_to_uniform_float(word, out[lane])


def _box_muller_into(uniforms: torch.Tensor, out: torch.Tensor) -> None:
    """pair_uniform_to_normal of the (4, n) uniforms, in place, written as out[:, 0..3] = n0..n3.

    The same float32 operations in the same order as pair_uniform_to_normal, so the same bits.
    """
    for (u1, u2), lanes in (((uniforms[0], uniforms[1]), (0, 1)), ((uniforms[2], uniforms[3]), (2, 3))):
        radius = u1.clamp_(min=1.0e-7).log_().mul_(-2.0).sqrt_()
        theta = u2.mul_(TWO_PI_F32)
        torch.mul(radius, torch.cos(theta), out=out[:, lanes[0]])
        torch.mul(radius, theta.sin_(), out=out[:, lanes[1]])


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
