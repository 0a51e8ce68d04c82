"""Fused GroupNorm + per-sample scale-shift + SiLU of a UNet residual block, forward and backward.

    group_norm_act(x, G, weight, bias, eps, scale, shift, silu)
        = SiLU((GroupNorm(x, G) * weight + bias) * (1 + scale) + shift)
x: (B, C, *spatial), contiguous or channels_last; weight, bias: (C,) or None; scale, shift: (B, C) or None (one
vector per sample, from the timestep embedding: improved DDPM's scale-shift norm); silu may be off (the
attention block's norm). Eager torch runs this as 5 kernels that read or write the whole tensor 9 times forward
and 13 times backward (statistics, normalise, multiply, add, SiLU; kernels/NOTES.md); here it is one read for the
statistics and one read + one write for the output (backward: two reads of x and dout, one write of dx). Arithmetic is float32 (statistics
too: biased variance, eps inside the sqrt, as torch.nn.functional.group_norm); outputs have x's dtype. The torch
reference below is the specification and the CPU path.

Tiling: a program owns one (sample, group): its C/G channels x S spatial positions, walked in (BLOCK_C, BLOCK_S)
tiles through strides, so contiguous and channels_last inputs need no copy. The statistics are sums shifted by
the group's first element (no cancellation when the mean is large against the spread, as in E[x^2] - mean^2).
The backward writes per-(sample, channel) sums (sum dz * xhat, sum dz; dz the gradient before the modulation),
from which the host forms d weight, d bias, d scale, d shift: no atomics, deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _checks
from ._tiling import next_pow2, warps_for
from .dispatch import choose_backend, interpreter_active

DEFAULT_EPS = 1e-5  # nn.GroupNorm's


# ---------------------------------------------------------------------------------------------
# Public entry point


def group_norm_act(x, num_groups: int, weight=None, bias=None, eps: float = DEFAULT_EPS, scale=None, shift=None,
                   *, silu: bool = True, backend=None, block_s=None):
    """SiLU((GroupNorm(x) * weight + bias) * (1 + scale) + shift); see the module docstring."""
    check_inputs(x, num_groups, weight, bias, scale, shift)
    if choose_backend(x, weight, bias, scale, shift, backend=backend) == "torch":
        return group_norm_act_reference(x, num_groups, weight, bias, eps, scale, shift, silu=silu)
    return fused_group_norm_act(x, weight, bias, scale, shift, int(num_groups), float(eps), bool(silu), block_s)


def check_inputs(x, num_groups, weight, bias, scale, shift) -> None:
    _checks.batch_tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *spatial) with at least one spatial dim, got {tuple(x.shape)}")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {channels} channels, got {num_groups!r}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together: give both or neither")
    for name, v, shape in (("weight", weight, (channels,)), ("bias", bias, (channels,)),
                           ("scale", scale, (x.shape[0], channels)), ("shift", shift, (x.shape[0], channels))):
        if v is None:
            continue
        _checks.batch_tensor(name, v)
        if v.shape != shape or v.device != x.device:
            raise ValueError(f"{name} must be {shape} on {x.device}, got {tuple(v.shape)} on {v.device}")


# ---------------------------------------------------------------------------------------------
# Torch reference (the specification; also the CPU path)


def group_norm_act_reference(x, num_groups, weight=None, bias=None, eps=DEFAULT_EPS, scale=None, shift=None, *,
                             silu=True):
    """The eager ops, in the UNet's order and dtypes (so the CPU path computes exactly what it always did)."""
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        h = h * (1 + scale.reshape(per_channel)) + shift.reshape(per_channel)
    return F.silu(h) if silu else h


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _group_tile(start, CPG, S, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(BLOCK_C, BLOCK_S) offsets of this program's group (channels x spatial from `start`), and the mask."""
    chans = tl.arange(0, BLOCK_C)
    pos = start + tl.arange(0, BLOCK_S)
    mask = (chans < CPG)[:, None] & (pos < S)[None, :]
    return chans[:, None].to(tl.int64) * stride_c + pos[None, :].to(tl.int64) * stride_s, mask


@triton.jit
def _channel_vectors(weight_ptr, bias_ptr, scale_ptr, shift_ptr, C, CPG, BLOCK_C: tl.constexpr,
                     HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr):
    """Per channel of this group: k = weight * (1 + scale) and m = bias * (1 + scale) + shift, float32, so that
    the pre-activation is xhat * k + m."""
    chans = tl.program_id(0) * CPG + tl.arange(0, BLOCK_C)
    ok = tl.arange(0, BLOCK_C) < CPG
    k = tl.full([BLOCK_C], 1.0, tl.float32)
    m = tl.zeros([BLOCK_C], tl.float32)
    if HAS_AFFINE:
        k = tl.load(weight_ptr + chans, mask=ok, other=1.0).to(tl.float32)
        m = tl.load(bias_ptr + chans, mask=ok, other=0.0).to(tl.float32)
    if HAS_MOD:
        per_sample = tl.program_id(1) * C + chans
        factor = 1.0 + tl.load(scale_ptr + per_sample, mask=ok, other=0.0).to(tl.float32)
        k = k * factor
        m = m * factor + tl.load(shift_ptr + per_sample, mask=ok, other=0.0).to(tl.float32)
    return k, m


@triton.jit
def _group_norm_act_fwd_kernel(x_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, mean_ptr, rstd_ptr,
                               C, CPG, S, x_sb, x_sc, x_ss, eps,
                               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_AFFINE: tl.constexpr,
                               HAS_MOD: tl.constexpr, SILU: tl.constexpr):
    b, g = tl.program_id(1), tl.program_id(0)
    base = b.to(tl.int64) * x_sb + (g * CPG).to(tl.int64) * x_sc
    pivot = tl.load(x_ptr + base).to(tl.float32)  # the shift of the sums
    total = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    squares = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for start in range(0, S, BLOCK_S):
        offsets, mask = _group_tile(start, CPG, S, x_sc, x_ss, BLOCK_C, BLOCK_S)
        d = tl.where(mask, tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
        total += d
        squares += d * d
    n = CPG * S
    shifted_mean = tl.sum(tl.sum(total, 1), 0) / n
    var = tl.maximum(tl.sum(tl.sum(squares, 1), 0) / n - shifted_mean * shifted_mean, 0.0)
    mean = pivot + shifted_mean
    rstd = 1.0 / tl.sqrt(var + eps)
    k, m = _channel_vectors(weight_ptr, bias_ptr, scale_ptr, shift_ptr, C, CPG, BLOCK_C, HAS_AFFINE, HAS_MOD)
    slope = (k * rstd)[:, None]
    for start in range(0, S, BLOCK_S):
        offsets, mask = _group_tile(start, CPG, S, x_sc, x_ss, BLOCK_C, BLOCK_S)
        # centred first: x * slope + (m - mean * slope) would cancel catastrophically when |mean| >> std
        u = (tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * slope + m[:, None]
        if SILU:
            u = u * tl.sigmoid(u)
        tl.store(out_ptr + base + offsets, u.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * tl.num_programs(0) + g, mean)
    tl.store(rstd_ptr + b * tl.num_programs(0) + g, rstd)


@triton.jit
def _backward_tile(x_group, dout_group, start, CPG, S, x_sc, x_ss, d_sc, d_ss, mean, rstd, k, m,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SILU: tl.constexpr):
    """One tile from `start`: x's offsets and mask, xhat, and the gradient dz at the modulated norm's output
    (before SiLU; zero outside the mask), float32."""
    x_off, mask = _group_tile(start, CPG, S, x_sc, x_ss, BLOCK_C, BLOCK_S)
    d_off, _ = _group_tile(start, CPG, S, d_sc, d_ss, BLOCK_C, BLOCK_S)
    xhat = (tl.load(x_group + x_off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dz = tl.load(dout_group + d_off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        u = xhat * k[:, None] + m[:, None]
        sig = tl.sigmoid(u)
        dz = dz * sig * (1.0 + u * (1.0 - sig))
    return x_off, mask, xhat, dz


@triton.jit
def _group_norm_act_bwd_kernel(x_ptr, dout_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                               dx_ptr, sums_ptr, C, CPG, S, x_sb, x_sc, x_ss, d_sb, d_sc, d_ss,
                               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_AFFINE: tl.constexpr,
                               HAS_MOD: tl.constexpr, SILU: tl.constexpr):
    """dx, and the per-(sample, channel) sums of dz * xhat and dz (dz: gradient before the modulation)."""
    b, g = tl.program_id(1), tl.program_id(0)
    x_base = b.to(tl.int64) * x_sb + (g * CPG).to(tl.int64) * x_sc
    d_base = b.to(tl.int64) * d_sb + (g * CPG).to(tl.int64) * d_sc
    mean = tl.load(mean_ptr + b * tl.num_programs(0) + g)
    rstd = tl.load(rstd_ptr + b * tl.num_programs(0) + g)
    k, m = _channel_vectors(weight_ptr, bias_ptr, scale_ptr, shift_ptr, C, CPG, BLOCK_C, HAS_AFFINE, HAS_MOD)
    dz_xhat = tl.zeros([BLOCK_C], tl.float32)
    dz_sum = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, S, BLOCK_S):
        _, _, xhat, dz = _backward_tile(x_ptr + x_base, dout_ptr + d_base, start, CPG, S, x_sc, x_ss, d_sc, d_ss,
                                        mean, rstd, k, m, BLOCK_C, BLOCK_S, SILU)
        dz_xhat += tl.sum(dz * xhat, 1)
        dz_sum += tl.sum(dz, 1)
    # d xhat = dz * k; dx = rstd * (d xhat - mean(d xhat) - xhat * mean(d xhat * xhat)) over the group
    n = CPG * S
    mean_dxhat = tl.sum(dz_sum * k, 0) / n
    mean_dxhat_xhat = tl.sum(dz_xhat * k, 0) / n
    for start in range(0, S, BLOCK_S):
        x_off, mask, xhat, dz = _backward_tile(x_ptr + x_base, dout_ptr + d_base, start, CPG, S, x_sc, x_ss, d_sc,
                                               d_ss, mean, rstd, k, m, BLOCK_C, BLOCK_S, SILU)
        dx = (dz * k[:, None] - mean_dxhat - xhat * mean_dxhat_xhat) * rstd
        tl.store(dx_ptr + x_base + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    chans = g * CPG + tl.arange(0, BLOCK_C)
    ok = tl.arange(0, BLOCK_C) < CPG
    tl.store(sums_ptr + (b * C + chans) * 2, dz_xhat, mask=ok)
    tl.store(sums_ptr + (b * C + chans) * 2 + 1, dz_sum, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def spatial_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(sample, channel, spatial) strides when t's spatial dims collapse into one strided axis (contiguous,
    channels_last, a broadcast gradient), else None."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1] or [(1, 1)]
    if any(outer != n * inner for (_, outer), (n, inner) in zip(dims, dims[1:])):
        return None
    return t.stride(0), t.stride(1), dims[-1][1]


def strided(t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t with collapsible spatial strides (copied into `like`'s memory format, or contiguous, only if needed)."""
    strides = spatial_strides(t)
    if strides is None:
        fmt = torch.channels_last if like is not None and like.dim() == 4 and like.is_contiguous(
            memory_format=torch.channels_last) and not like.is_contiguous() else torch.contiguous_format
        t = t.contiguous(memory_format=fmt)
        strides = spatial_strides(t)
    return t, strides


def pick_block_s(channels_per_group: int, spatial: int, block_s: int | None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): a tile of ~4K elements on a GPU, as large as allowed in the interpreter."""
    block_c = next_pow2(channels_per_group)
    if block_s is not None:
        if block_s < 1 or block_s & (block_s - 1):
            raise ValueError(f"block_s must be a power of two >= 1, got {block_s}")
        return block_c, block_s
    budget = 65536 if interpreter_active() else 4096
    return block_c, max(1, min(next_pow2(spatial), budget // block_c))


def _vectors(x, weight, bias, scale, shift):
    """Kernel pointer arguments: absent vectors are passed as x (never read: HAS_AFFINE / HAS_MOD are off)."""
    return [x if v is None else v for v in (weight, bias, scale, shift)]


def launch_forward(x, num_groups, weight, bias, scale, shift, eps, silu, out, mean, rstd, block_s=None):
    """Forward into `out` (x's shape and strides) and per-(sample, group) `mean`, `rstd` (B*G,) float32; the
    (C,) / (B, C) vectors contiguous."""
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    cpg = channels // num_groups
    block_c, block_s = pick_block_s(cpg, spatial, block_s)
    x_strides = spatial_strides(x)
    if spatial_strides(out) != x_strides:
        raise ValueError("out must have x's strides")
    _group_norm_act_fwd_kernel[(num_groups, batch)](
        x, *_vectors(x, weight, bias, scale, shift), out, mean, rstd, channels, cpg, spatial, *x_strides, eps,
        BLOCK_C=block_c, BLOCK_S=block_s, HAS_AFFINE=weight is not None, HAS_MOD=scale is not None, SILU=silu,
        num_warps=warps_for(block_c * block_s))
    return out


def launch_backward(x, dout, num_groups, weight, bias, scale, shift, silu, mean, rstd, dx, block_s=None):
    """Writes dx (x's strides); returns the (B, C, 2) float32 sums of dz * xhat and dz over each channel."""
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    cpg = channels // num_groups
    block_c, block_s = pick_block_s(cpg, spatial, block_s)
    sums = torch.empty((batch, channels, 2), dtype=torch.float32, device=x.device)
    _group_norm_act_bwd_kernel[(num_groups, batch)](
        x, dout, *_vectors(x, weight, bias, scale, shift), mean, rstd, dx, sums, channels, cpg, spatial,
        *spatial_strides(x), *spatial_strides(dout),
        BLOCK_C=block_c, BLOCK_S=block_s, HAS_AFFINE=weight is not None, HAS_MOD=scale is not None, SILU=silu,
        num_warps=warps_for(block_c * block_s))
    return sums


def parameter_grads(sums, weight, bias, scale):
    """d weight, d bias (C,), d scale, d shift (B, C) in float32 from the per-(sample, channel) sums.
    z = (xhat * w + b) * (1 + s) + t, so dw = sum_b A (1 + s), db = sum_b B (1 + s), ds = w A + b B, dt = B,
    with A = sum dz * xhat and B = sum dz over a channel's positions."""
    a, b = sums.unbind(-1)
    factor = 1 + scale.float() if scale is not None else None
    d_weight = d_bias = d_scale = None
    if weight is not None:
        d_weight = (a * factor if factor is not None else a).sum(0)
        d_bias = (b * factor if factor is not None else b).sum(0)
    if scale is not None:
        d_scale = a * weight.float() + b * bias.float() if weight is not None else a
    return d_weight, d_bias, d_scale, b


# ---------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees one opaque op per call (no graph break, no tracing into the launches) and
# fuses the code around it; autograd pairs the forward op with the backward op.


@torch.library.custom_op("diffusion_kernels::group_norm_act", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, num_groups: int, eps: float, silu: bool,
                block_s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd) for an x already `packed`; block_s 0 picks the tile."""
    mean, rstd = (torch.empty(x.shape[0] * num_groups, dtype=torch.float32, device=x.device) for _ in range(2))
    out = launch_forward(x, num_groups, weight, bias, scale, shift, eps, silu, torch.empty_like(x), mean, rstd,
                         block_s or None)
    return out, mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu, block_s):
    stats = x.new_empty((x.shape[0] * num_groups,), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("diffusion_kernels::group_norm_act_backward", mutates_args=())
def _backward_op(x: torch.Tensor, dout: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                 num_groups: int, silu: bool, block_s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, per-(sample, channel) sums) for a dout with collapsible spatial strides."""
    dx = torch.empty_like(x)
    sums = launch_backward(x, dout, num_groups, weight, bias, scale, shift, silu, mean, rstd, dx, block_s or None)
    return dx, sums


@_backward_op.register_fake
def _(x, dout, weight, bias, scale, shift, mean, rstd, num_groups, silu, block_s):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[1], 2), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, _, silu, block_s = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.block_s = num_groups, silu, block_s


def _backward(ctx, dout, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dout, _ = strided(dout, like=x)
    dx, sums = _backward_op(x, dout, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu, ctx.block_s)
    grads = parameter_grads(sums, weight, bias, scale)
    d_weight, d_bias, d_scale, d_shift = (None if g is None or v is None else g.to(v.dtype)
                                          for g, v in zip(grads, (weight, bias, scale, shift)))
    return dx, d_weight, d_bias, d_scale, d_shift, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_group_norm_act(x, weight, bias, scale, shift, num_groups, eps, silu, block_s=None):
    """The Triton path of `group_norm_act` (arguments checked there)."""
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias come together in the fused kernel: give both or neither")
    weight, bias, scale, shift = (None if v is None else v.contiguous() for v in (weight, bias, scale, shift))
    out, _, _ = _forward_op(packed(x), weight, bias, scale, shift, num_groups, eps, silu, block_s or 0)
    return out


def packed(x: torch.Tensor) -> torch.Tensor:
    """x with collapsible spatial strides and no gaps (so an output like it has the same strides): as it is when
    contiguous or channels_last, else copied."""
    x, strides = strided(x)
    if spatial_strides(torch.empty_like(x, device="meta")) != strides:  # a view with gaps (a slice of channels)
        x = x.contiguous()
    return x
