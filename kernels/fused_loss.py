"""Fused noising (kernel A) and diffusion loss with its gradient (kernel B).

Kernel A: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with eps drawn in-kernel (kernels.noise), never stored.
Kernel B: regenerates the same eps from the seed and, in one pass over model_out, reduces the squared
error per (sample, block) and writes d loss / d model_out; a one-program kernel then turns the partial
sums into the loss, the per-sample losses and the per-bucket sums (deterministic: no atomics).
The autograd Function's backward only scales the stored gradient by the incoming gradient.

Semantics (the torch references below are the spec):
  target  = eps | x0 | v = sqrt(ab) eps - sqrt(1 - ab) x0
  per_sample[i] = mean_j (model_out[i, j] - target[i, j])**2        (float32, unweighted, detached)
  loss    = mean_i weights[i] * per_sample[i]                          (weights default to 1)
  bucket_sums[k] = sum of per_sample over samples with buckets[i] == k; bucket_counts[k] = their number
(buckets outside [0, num_buckets) are counted nowhere; without buckets both are zeros).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _checks
from .dispatch import choose_backend, interpreter_active
from ._tiling import cdiv, next_pow2, pick_block, tile, warps_for
from .noise import check_stream, noise_tile, randn, seed_key

TARGETS = ("eps", "x0", "v")


class LossOutput(NamedTuple):
    loss: torch.Tensor  # () float32, differentiable w.r.t. model_out
    per_sample: torch.Tensor  # (B,) float32 per-sample mean squared error, unweighted
    bucket_sums: torch.Tensor  # (num_buckets,) float32
    bucket_counts: torch.Tensor  # (num_buckets,) int64


# ---------------------------------------------------------------------------------------------
# Public entry points


def q_sample(x0, alpha_bar, seed, sample_ids, stream, backend=None, *, block_size=None):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) noise(seed, stream, sample_id, j), in x0's dtype (no grad)."""
    batch, _ = _checks.batch_tensor("x0", x0)
    alpha_bar = _checks.per_sample_vector("alpha_bar", alpha_bar, batch, x0.device)
    sample_ids = _checks.per_sample_vector("sample_ids", sample_ids, batch, x0.device, integer=True)
    seed_key(seed), check_stream(stream)
    if choose_backend(x0, backend=backend) == "torch":
        return q_sample_reference(x0, alpha_bar, seed, sample_ids, stream)
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    return launch_q_sample(x0, alpha_bar, seed, sample_ids, stream, x_t, block_size=block_size)


def diffusion_loss(model_out, x0, alpha_bar, seed, sample_ids, stream, *, target="eps", weights=None,
                   buckets=None, num_buckets=4, backend=None, block_size=None) -> LossOutput:
    """The diffusion training loss of model_out against the target named by `target` (see module doc)."""
    batch, _ = _checks.batch_tensor("model_out", model_out)
    _checks.same_as("x0", x0, "model_out", model_out)
    _checks.choice("target", target, TARGETS)
    device = model_out.device
    alpha_bar = _checks.per_sample_vector("alpha_bar", alpha_bar, batch, device)
    sample_ids = _checks.per_sample_vector("sample_ids", sample_ids, batch, device, integer=True)
    if weights is not None:
        weights = _checks.per_sample_vector("weights", weights, batch, device)
    if buckets is not None:
        buckets = _checks.per_sample_vector("buckets", buckets, batch, device, integer=True)
    if not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
    seed_key(seed), check_stream(stream)
    if choose_backend(model_out, x0, backend=backend) == "torch":
        return diffusion_loss_reference(model_out, x0, alpha_bar, seed, sample_ids, stream, target=target,
                                        weights=weights, buckets=buckets, num_buckets=num_buckets)
    options = LossOptions(target, num_buckets, block_size)
    return LossOutput(*FusedDiffusionLoss.apply(model_out, x0, alpha_bar, weights, sample_ids, buckets,
                                                seed, stream, options))


# ---------------------------------------------------------------------------------------------
# Torch references (the specification; also the CPU path)


def q_sample_reference(x0, alpha_bar, seed, sample_ids, stream):
    eps = randn(seed, stream, sample_ids, x0.shape[1:])
    ab = alpha_bar.to(torch.float32).reshape(-1, *([1] * (x0.dim() - 1)))
    return (torch.sqrt(ab) * x0.to(torch.float32) + torch.sqrt(1.0 - ab) * eps).to(x0.dtype)


def loss_target(target, x0, eps, alpha_bar):
    """The regression target in float32 for eps / x0 / v prediction."""
    ab = alpha_bar.to(torch.float32).reshape(-1, *([1] * (x0.dim() - 1)))
    if target == "eps":
        return eps
    if target == "x0":
        return x0.to(torch.float32)
    return torch.sqrt(ab) * eps - torch.sqrt(1.0 - ab) * x0.to(torch.float32)


def bucket_stats(per_sample, buckets, num_buckets):
    """Per-bucket sums of per_sample and counts; samples with a bucket outside the range count nowhere."""
    if buckets is None:
        zeros = torch.zeros(num_buckets, dtype=torch.float32, device=per_sample.device)
        return zeros, zeros.to(torch.int64)
    one_hot = buckets.reshape(-1, 1) == torch.arange(num_buckets, device=buckets.device).reshape(1, -1)
    sums = (one_hot * per_sample.reshape(-1, 1)).sum(0)
    return sums.to(torch.float32), one_hot.sum(0).to(torch.int64)


def diffusion_loss_reference(model_out, x0, alpha_bar, seed, sample_ids, stream, *, target="eps",
                             weights=None, buckets=None, num_buckets=4) -> LossOutput:
    batch = model_out.shape[0]
    eps = randn(seed, stream, sample_ids, x0.shape[1:])
    error = model_out.to(torch.float32) - loss_target(target, x0, eps, alpha_bar)
    per_sample = error.square().reshape(batch, -1).mean(1)
    weighted = per_sample if weights is None else weights.to(torch.float32) * per_sample
    sums, counts = bucket_stats(per_sample.detach(), buckets, num_buckets)
    return LossOutput(weighted.mean(), per_sample.detach(), sums, counts)


# ---------------------------------------------------------------------------------------------
# Triton kernels


class LossOptions(NamedTuple):
    target: str
    num_buckets: int
    block_size: int | None


@triton.jit(do_not_specialize=["seed", "stream"])
def _q_sample_kernel(x0_ptr, xt_ptr, alpha_bar_ptr, sample_ids_ptr, seed, stream, N,
                     GROUPS: tl.constexpr):
    sample = tl.program_id(1)
    group, j, mask = tile(N, GROUPS)
    offsets = sample.to(tl.int64) * N + j
    alpha_bar = tl.load(alpha_bar_ptr + sample)
    eps = noise_tile(seed, stream, tl.load(sample_ids_ptr + sample).to(tl.uint32), group)
    x0 = tl.load(x0_ptr + offsets, mask=mask).to(tl.float32)
    x_t = tl.sqrt(alpha_bar) * x0 + tl.sqrt(1.0 - alpha_bar) * eps
    tl.store(xt_ptr + offsets, x_t.to(xt_ptr.dtype.element_ty), mask=mask)


TARGET_CODE = {"eps": 0, "x0": 1, "v": 2}


@triton.jit(do_not_specialize=["seed", "stream"])
def _loss_kernel(out_ptr, x0_ptr, grad_ptr, partial_ptr, alpha_bar_ptr, weights_ptr, sample_ids_ptr,
                 seed, stream, N, grad_scale, TARGET: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, GROUPS: tl.constexpr):
    sample = tl.program_id(1)
    group, j, mask = tile(N, GROUPS)
    offsets = sample.to(tl.int64) * N + j
    out = tl.load(out_ptr + offsets, mask=mask).to(tl.float32)
    if TARGET == 1:  # x0 prediction needs no noise
        target = tl.load(x0_ptr + offsets, mask=mask).to(tl.float32)
    else:
        eps = noise_tile(seed, stream, tl.load(sample_ids_ptr + sample).to(tl.uint32), group)
        if TARGET == 0:  # eps prediction reads no x0
            target = eps
        else:
            alpha_bar = tl.load(alpha_bar_ptr + sample)
            x0 = tl.load(x0_ptr + offsets, mask=mask).to(tl.float32)
            target = tl.sqrt(alpha_bar) * eps - tl.sqrt(1.0 - alpha_bar) * x0
    error = tl.where(mask, out - target, 0.0)
    tl.store(partial_ptr + sample * tl.num_programs(0) + tl.program_id(0), tl.sum(tl.sum(error * error, 1), 0))
    if WRITE_GRAD:
        scale = grad_scale
        if HAS_WEIGHTS:
            scale = scale * tl.load(weights_ptr + sample)
        tl.store(grad_ptr + offsets, (error * scale).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_loss_kernel(partial_ptr, weights_ptr, buckets_ptr, per_sample_ptr, loss_ptr, bucket_sums_ptr,
                        bucket_counts_ptr, B, BLOCKS, inv_n, HAS_WEIGHTS: tl.constexpr,
                        HAS_BUCKETS: tl.constexpr, NUM_BUCKETS: tl.constexpr, BUCKETS_POW2: tl.constexpr,
                        ROWS: tl.constexpr, COLS: tl.constexpr):
    """One program: partial sums (B, BLOCKS) -> per-sample losses, weighted mean, bucket sums/counts
    (written as zeros without buckets)."""
    bucket_ids = tl.arange(0, BUCKETS_POW2)
    bucket_sums = tl.zeros([BUCKETS_POW2], tl.float32)
    bucket_counts = tl.zeros([BUCKETS_POW2], tl.int64)
    total = tl.zeros([ROWS], tl.float32)
    for row_start in range(0, B, ROWS):
        rows = row_start + tl.arange(0, ROWS)
        row_ok = rows < B
        acc = tl.zeros([ROWS], tl.float32)
        for col_start in range(0, BLOCKS, COLS):
            cols = col_start + tl.arange(0, COLS)
            tile = tl.load(partial_ptr + rows[:, None] * BLOCKS + cols[None, :],
                           mask=row_ok[:, None] & (cols[None, :] < BLOCKS), other=0.0)
            acc += tl.sum(tile, 1)
        per_sample = acc * inv_n
        tl.store(per_sample_ptr + rows, per_sample, mask=row_ok)
        if HAS_WEIGHTS:
            total += tl.load(weights_ptr + rows, mask=row_ok, other=0.0) * per_sample
        else:
            total += per_sample
        if HAS_BUCKETS:
            bucket = tl.load(buckets_ptr + rows, mask=row_ok, other=-1)
            hit = (bucket[:, None] == bucket_ids[None, :]) & row_ok[:, None]
            bucket_sums += tl.sum(tl.where(hit, per_sample[:, None], 0.0), 0)
            bucket_counts += tl.sum(hit.to(tl.int64), 0)
    tl.store(loss_ptr, tl.sum(total, 0) / B)
    keep = bucket_ids < NUM_BUCKETS
    tl.store(bucket_sums_ptr + bucket_ids, bucket_sums, mask=keep)
    tl.store(bucket_counts_ptr + bucket_ids, bucket_counts, mask=keep)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """x *= scale, read from the device; a no-op (no memory traffic) when the scale is exactly 1."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(x_ptr + offsets, (x.to(tl.float32) * scale).to(x.dtype), mask=mask)


def launch_q_sample(x0, alpha_bar, seed, sample_ids, stream, x_t, *, block_size=None):
    """Kernel A into the preallocated contiguous x_t (the tests poison it first)."""
    batch, n = x0.shape[0], x0[0].numel()
    block = pick_block(n, block_size)
    grid = (cdiv(n, block), batch)
    _q_sample_kernel[grid](x0.contiguous(), x_t, alpha_bar, sample_ids, seed, stream, n,
                           GROUPS=block // 4, num_warps=warps_for(block))
    return x_t


def launch_loss(model_out, x0, alpha_bar, weights, sample_ids, buckets, seed, stream, options, grad,
                per_sample):
    """Kernel B + the finishing kernel. Writes grad (unless None) and per_sample; returns loss, sums, counts."""
    batch, n = model_out.shape[0], model_out[0].numel()
    block = pick_block(n, options.block_size)
    blocks = cdiv(n, block)
    device = model_out.device
    partial = torch.empty((batch, blocks), dtype=torch.float32, device=device)
    _loss_kernel[(blocks, batch)](
        model_out.contiguous(), x0.contiguous(), grad, partial, alpha_bar, weights, sample_ids, seed, stream,
        n, 2.0 / (n * batch), TARGET=TARGET_CODE[options.target], HAS_WEIGHTS=weights is not None,
        WRITE_GRAD=grad is not None, GROUPS=block // 4, num_warps=warps_for(block))
    loss = torch.empty((), dtype=torch.float32, device=device)
    sums = torch.empty(options.num_buckets, dtype=torch.float32, device=device)
    counts = torch.empty(options.num_buckets, dtype=torch.int64, device=device)
    rows = min(next_pow2(batch), 64 if interpreter_active() else 128)
    cols = min(next_pow2(blocks), 64)
    _finish_loss_kernel[(1,)](
        partial, weights, buckets, per_sample, loss, sums, counts, batch, blocks, 1.0 / n,
        HAS_WEIGHTS=weights is not None, HAS_BUCKETS=buckets is not None, NUM_BUCKETS=options.num_buckets,
        BUCKETS_POW2=next_pow2(options.num_buckets), ROWS=rows, COLS=cols)
    return loss, sums, counts


def scale_inplace(x, scale):
    block = 65536 if interpreter_active() else 4096
    _scale_kernel[(cdiv(x.numel(), block),)](x, scale.to(torch.float32).reshape(()), x.numel(),
                                                    BLOCK=block, num_warps=8 if block >= 4096 else 4)


class FusedDiffusionLoss(torch.autograd.Function):
    """Loss and d loss / d model_out in one forward pass; backward scales the stored gradient in place."""

    @staticmethod
    def forward(ctx, model_out, x0, alpha_bar, weights, sample_ids, buckets, seed, stream, options):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty(model_out.shape, dtype=model_out.dtype, device=model_out.device) if need_grad else None
        per_sample = torch.empty(model_out.shape[0], dtype=torch.float32, device=model_out.device)
        loss, sums, counts = launch_loss(model_out, x0, alpha_bar, weights, sample_ids, buckets, seed, stream,
                                         options, grad, per_sample)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.backward_done = False
        ctx.mark_non_differentiable(per_sample, sums, counts)
        return loss, per_sample, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.backward_done:
            raise RuntimeError("the fused diffusion loss scales its stored gradient in place: "
                               "backward through it twice (retain_graph) is not supported")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        scale_inplace(grad, grad_loss)
        return grad, None, None, None, None, None, None, None, None
