"""Fused adaLN ops of a DiT block: LayerNorm + modulation, and the gated residual, forward and backward.

Both are memory-bound elementwise/row ops that eager torch runs as 4-6 separate passes over the tokens:
    modulated_layer_norm(x, shift, scale) = LayerNorm(x) * (1 + scale) + shift    (no affine weights: adaLN)
    gated_residual(x, gate, y)            = x + gate * y
x, y: (B, N, D) tokens; shift, scale, gate: (B, D), one vector per sample broadcast over its N tokens.
Outputs have x's dtype; arithmetic is float32 (LayerNorm statistics too, biased variance, eps inside the sqrt,
as torch.nn.functional.layer_norm). The torch references below are the spec and the CPU path.

Tiling: a program owns ROWS whole rows (tokens) of one sample, so the row statistics need no second pass and
the (B, D) vectors are loaded once per program. The backward kernels also reduce d shift / d scale / d gate
over their rows into per-program partial sums (B, programs, D), summed afterwards: no atomics, deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _checks
from ._tiling import cdiv, next_pow2, warps_for
from .dispatch import choose_backend, interpreter_active

DEFAULT_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Public entry points


def modulated_layer_norm(x, shift, scale, eps=DEFAULT_EPS, *, backend=None, block_rows=None):
    """LayerNorm(x) * (1 + scale) + shift over the last dim of (B, N, D) x; shift, scale (B, D)."""
    check_tokens(x, shift=shift, scale=scale)
    if choose_backend(x, shift, scale, backend=backend) == "torch":
        return modulated_layer_norm_reference(x, shift, scale, eps)
    return ModulatedLayerNorm.apply(x, shift, scale, float(eps), block_rows)


def gated_residual(x, gate, y, *, backend=None, block_rows=None):
    """x + gate * y for (B, N, D) x and y, gate (B, D)."""
    check_tokens(x, gate=gate)
    _checks.same_as("y", y, "x", x)
    if choose_backend(x, gate, y, backend=backend) == "torch":
        return gated_residual_reference(x, gate, y)
    return GatedResidual.apply(x, gate, y, block_rows)


def check_tokens(x, **vectors):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (B, N, D) tokens, got {shape}")
    _checks.batch_tensor("x", x)
    for name, v in vectors.items():
        _checks.batch_tensor(name, v)
        if v.shape != (x.shape[0], x.shape[2]) or v.device != x.device:
            raise ValueError(f"{name} must be ({x.shape[0]}, {x.shape[2]}) on {x.device} (one vector per sample), "
                             f"got {tuple(v.shape)} on {v.device}")


# ---------------------------------------------------------------------------------------------
# Torch references (the specification; also the CPU path)


def modulated_layer_norm_reference(x, shift, scale, eps=DEFAULT_EPS):
    normed = F.layer_norm(x.to(torch.float32), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.to(torch.float32)[:, None]) + shift.to(torch.float32)[:, None]).to(x.dtype)


def gated_residual_reference(x, gate, y):
    return (x.to(torch.float32) + gate.to(torch.float32)[:, None] * y.to(torch.float32)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _row_tile(rows_start, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This tile's row ids, (ROWS, BLOCK_D) offsets into sample b's (N, D) block, and masks."""
    rows = rows_start + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    base = tl.program_id(1).to(tl.int64) * N * D
    return rows, row_ok, mask, base + rows[:, None].to(tl.int64) * D + cols[None, :]


@triton.jit
def _vector(ptr, D, BLOCK_D: tl.constexpr):
    """Sample b's row of a (B, D) vector, float32, zero past D."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + tl.program_id(1) * D + cols, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _modulated_ln_fwd_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr, N, D, eps,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, mask, offsets = _row_tile(tl.program_id(0) * ROWS, N, D, ROWS, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / D + eps)
    shift, scale = _vector(shift_ptr, D, BLOCK_D), _vector(scale_ptr, D, BLOCK_D)
    out = centered * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    stats = tl.program_id(1) * N + rows
    tl.store(mean_ptr + stats, mean, mask=row_ok)
    tl.store(rstd_ptr + stats, rstd, mask=row_ok)


@triton.jit
def _modulated_ln_bwd_kernel(x_ptr, scale_ptr, dout_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, N, D,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    """dx, and this program's partial sums of d scale = sum dout * xhat and d shift = sum dout over its rows."""
    scale = _vector(scale_ptr, D, BLOCK_D)
    dscale = tl.zeros([BLOCK_D], tl.float32)
    dshift = tl.zeros([BLOCK_D], tl.float32)
    for i in range(TILES):
        rows, row_ok, mask, offsets = _row_tile((tl.program_id(0) * TILES + i) * ROWS, N, D, ROWS, BLOCK_D)
        stats = tl.program_id(1) * N + rows
        mean = tl.load(mean_ptr + stats, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + stats, mask=row_ok, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dscale += tl.sum(dout * xhat, 0)
        dshift += tl.sum(dout, 0)
        g = dout * (1.0 + scale[None, :])  # d loss / d xhat
        dx = (g - tl.sum(g, 1)[:, None] / D - xhat * (tl.sum(g * xhat, 1)[:, None] / D)) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    cols = tl.arange(0, BLOCK_D)
    part = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 2 * D + cols
    tl.store(partial_ptr + part, dscale, mask=cols < D)
    tl.store(partial_ptr + part + D, dshift, mask=cols < D)


@triton.jit
def _gated_residual_fwd_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _, _, mask, offsets = _row_tile(tl.program_id(0) * ROWS, N, D, ROWS, BLOCK_D)
    gate = _vector(gate_ptr, D, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (x + gate[None, :] * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(gate_ptr, y_ptr, dout_ptr, dy_ptr, partial_ptr, N, D,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    """dy = gate * dout, and this program's partial sum of d gate = sum dout * y (dx = dout needs no pass)."""
    gate = _vector(gate_ptr, D, BLOCK_D)
    dgate = tl.zeros([BLOCK_D], tl.float32)
    for i in range(TILES):
        _, _, mask, offsets = _row_tile((tl.program_id(0) * TILES + i) * ROWS, N, D, ROWS, BLOCK_D)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dgate += tl.sum(dout * y, 0)
        tl.store(dy_ptr + offsets, (dout * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)
    cols = tl.arange(0, BLOCK_D)
    tl.store(partial_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * D + cols, dgate,
             mask=cols < D)


class Tiling(NamedTuple):
    rows: int  # rows per tile (a power of two)
    tiles: int  # tiles per backward program (its rows share one partial sum)
    block_d: int
    warps: int


def pick_tiling(n: int, d: int, block_rows: int | None) -> Tiling:
    """~4K elements a tile on a GPU (one row when D is large); as big as allowed in the interpreter (~2 ms a
    program whatever its size). A backward program covers ~64 rows so the partial sums stay small."""
    block_d = next_pow2(d)
    if block_rows is not None:
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"block_rows must be a power of two >= 1, got {block_rows}")
        rows = block_rows
    else:
        budget = 65536 if interpreter_active() else 4096
        rows = max(1, min(next_pow2(n), budget // block_d))
    tiles = 1 if interpreter_active() else max(1, 64 // rows)
    return Tiling(rows, tiles, block_d, warps_for(rows * block_d))


def launch_modulated_ln(x, shift, scale, eps, out, mean, rstd, block_rows=None):
    """Forward into the preallocated `out` (B, N, D) and row statistics `mean`, `rstd` (B*N,) float32."""
    batch, n, d = x.shape
    t = pick_tiling(n, d, block_rows)
    _modulated_ln_fwd_kernel[(cdiv(n, t.rows), batch)](
        x, shift, scale, out, mean, rstd, n, d, eps, ROWS=t.rows, BLOCK_D=t.block_d, num_warps=t.warps)
    return out


def launch_modulated_ln_backward(x, scale, dout, mean, rstd, dx, block_rows=None):
    """Writes dx; returns (d shift, d scale) in float32, (B, D) each."""
    batch, n, d = x.shape
    t = pick_tiling(n, d, block_rows)
    programs = cdiv(n, t.rows * t.tiles)
    partial = torch.empty((batch, programs, 2, d), dtype=torch.float32, device=x.device)
    _modulated_ln_bwd_kernel[(programs, batch)](
        x, scale, dout, mean, rstd, dx, partial, n, d, ROWS=t.rows, BLOCK_D=t.block_d, TILES=t.tiles,
        num_warps=t.warps)
    dscale, dshift = partial.sum(1).unbind(1)
    return dshift, dscale


def launch_gated_residual(x, gate, y, out, block_rows=None):
    batch, n, d = x.shape
    t = pick_tiling(n, d, block_rows)
    _gated_residual_fwd_kernel[(cdiv(n, t.rows), batch)](
        x, gate, y, out, n, d, ROWS=t.rows, BLOCK_D=t.block_d, num_warps=t.warps)
    return out


def launch_gated_residual_backward(gate, y, dout, dy, block_rows=None):
    """Writes dy; returns d gate in float32 (B, D)."""
    batch, n, d = y.shape
    t = pick_tiling(n, d, block_rows)
    programs = cdiv(n, t.rows * t.tiles)
    partial = torch.empty((batch, programs, d), dtype=torch.float32, device=y.device)
    _gated_residual_bwd_kernel[(programs, batch)](
        gate, y, dout, dy, partial, n, d, ROWS=t.rows, BLOCK_D=t.block_d, TILES=t.tiles, num_warps=t.warps)
    return partial.sum(1)


class ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, block_rows):
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        batch, n, _ = x.shape
        mean = torch.empty(batch * n, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        out = launch_modulated_ln(x, shift, scale, eps, torch.empty_like(x), mean, rstd, block_rows)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.block_rows, ctx.shift_dtype = block_rows, shift.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        dx = torch.empty_like(x)
        dshift, dscale = launch_modulated_ln_backward(x, scale, dout.contiguous(), mean, rstd, dx, ctx.block_rows)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None


class GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, block_rows):
        x, gate, y = x.contiguous(), gate.contiguous(), y.contiguous()
        ctx.save_for_backward(gate, y)
        ctx.block_rows, ctx.x_dtype = block_rows, x.dtype
        return launch_gated_residual(x, gate, y, torch.empty_like(x), block_rows)

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        dy = torch.empty_like(y)
        dgate = launch_gated_residual_backward(gate, y, dout, dy, ctx.block_rows)
        return dout.to(ctx.x_dtype), dgate.to(gate.dtype), dy, None
