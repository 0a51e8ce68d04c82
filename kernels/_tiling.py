"""How the fused kernels tile a (B, N) batch: a program owns a (GROUPS, 4) tile of one sample.

Row g of a tile is one Philox counter (j // 4), so each Philox call feeds 4 consecutive elements.
The host-side helpers avoid triton.cdiv / next_power_of_2, which cost tens of microseconds a call.
"""
import triton
import triton.language as tl

from .dispatch import interpreter_active


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pick_block(elements_per_sample: int, block_size: int | None) -> int:
    """Elements per program: a power of two >= 4 (4 consecutive elements share one Philox call).

    In the interpreter each program costs ~2 ms (~60 ms when it draws noise) whatever its size, so blocks
    there are as large as allowed.
    """
    if block_size is not None:
        if block_size < 4 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 4, got {block_size}")
        return block_size
    if interpreter_active():
        return min(65536, max(4, next_pow2(elements_per_sample)))
    return min(2048, max(4, next_pow2(elements_per_sample)))


def warps_for(block: int) -> int:
    return max(1, min(8, block // 512))


@triton.jit
def tile(N, GROUPS: tl.constexpr):
    """This program's Philox counters (GROUPS,) and the (GROUPS, 4) element indices j inside its sample."""
    group = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    j = group[:, None] * 4 + tl.arange(0, 4)[None, :]
    return group, j, j < N
