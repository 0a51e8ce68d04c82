"""One fused pass per sampler step: CFG combination, x0 conversion, optional clipping, linear update, noise.

Every update used here (DDPM ancestral, DDIM(eta), DPM-Solver++(2M)) is linear in (x0_hat, x0_prev, x_t)
plus fresh counter-based noise (docs/ARCHITECTURE.md):
    out    = model_out, or  u + w (c - u)  with classifier-free guidance (u = model_out_uncond)
    x0_hat = convert(out, x_t) by `prediction` (eps / x0 / v), optionally clamped to [-1, 1]
    x_next = c_x0 x0_hat + c_x0_prev x0_prev + c_xt x_t + sigma noise(seed, stream, sample_id, j)
`coeffs` = [sqrt_ab_t, sqrt_1m_ab_t, c_x0, c_x0_prev, c_xt, sigma] is a float32 tensor on the data's device
that the kernel reads itself, so a sampling loop makes no host-device sync and can be captured in a CUDA graph.
Both outputs have x_t's dtype; arithmetic is float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks
from .dispatch import choose_backend
from ._tiling import cdiv, pick_block, tile, warps_for
from .noise import check_stream, noise_tile, randn, seed_key

PREDICTIONS = ("eps", "x0", "v")
NUM_COEFFS = 6


def sampler_update(x_t, model_out, coeffs, *, prediction="eps", model_out_uncond=None, guidance=1.0,
                   clip_x0=False, x0_prev=None, seed=0, sample_ids=None, stream=0, backend=None,
                   block_size=None):
    """One sampler step; returns (x_next, x0_hat). sample_ids default to arange(B)."""
    batch, _ = _checks.batch_tensor("x_t", x_t)
    _checks.same_as("model_out", model_out, "x_t", x_t)
    if model_out_uncond is not None:
        _checks.same_as("model_out_uncond", model_out_uncond, "x_t", x_t)
    if x0_prev is not None:
        _checks.same_as("x0_prev", x0_prev, "x_t", x_t)
    _checks.choice("prediction", prediction, PREDICTIONS)
    coeffs = check_coeffs(coeffs, x_t.device)
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=x_t.device)
    sample_ids = _checks.per_sample_vector("sample_ids", sample_ids, batch, x_t.device, integer=True)
    seed_key(seed), check_stream(stream)
    args = (x_t, model_out, coeffs, prediction, model_out_uncond, float(guidance), bool(clip_x0), x0_prev, seed,
            sample_ids, stream)
    if choose_backend(x_t, backend=backend) == "torch":
        return sampler_update_reference(*args)
    x_next = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    x0_hat = torch.empty_like(x_next)
    return launch_sampler_update(*args, x_next, x0_hat, block_size=block_size)


def check_coeffs(coeffs, device):
    if not isinstance(coeffs, torch.Tensor) or coeffs.shape != (NUM_COEFFS,):
        shape = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise ValueError("coeffs must be a (6,) tensor [sqrt_ab_t, sqrt_1m_ab_t, c_x0, c_x0_prev, c_xt, sigma], "
                         f"got {shape}")
    if coeffs.device != device:
        raise ValueError(f"coeffs is on {coeffs.device} but x_t is on {device}: build the table on the device")
    return coeffs.to(torch.float32).contiguous()


def sampler_update_reference(x_t, model_out, coeffs, prediction="eps", model_out_uncond=None, guidance=1.0,
                             clip_x0=False, x0_prev=None, seed=0, sample_ids=None, stream=0):
    """The specification in plain torch (float32 arithmetic, outputs in x_t's dtype)."""
    sqrt_ab, sqrt_1m_ab, c_x0, c_x0_prev, c_xt, sigma = coeffs.to(torch.float32).unbind()
    x = x_t.to(torch.float32)
    out = model_out.to(torch.float32)
    if model_out_uncond is not None:
        uncond = model_out_uncond.to(torch.float32)
        out = uncond + guidance * (out - uncond)
    if prediction == "eps":
        x0_hat = (x - sqrt_1m_ab * out) / sqrt_ab
    elif prediction == "x0":
        x0_hat = out
    else:
        x0_hat = sqrt_ab * x - sqrt_1m_ab * out
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    x_next = c_x0 * x0_hat + c_xt * x
    if x0_prev is not None:
        x_next = x_next + c_x0_prev * x0_prev.to(torch.float32)
    if sigma.item() != 0.0:  # deterministic steps (DDIM eta=0, DPM-Solver++) draw no noise, like the kernel
        x_next = x_next + sigma * randn(seed, stream, sample_ids, x_t.shape[1:])
    return x_next.to(x_t.dtype), x0_hat.to(x_t.dtype)


PREDICTION_CODE = {"eps": 0, "x0": 1, "v": 2}


@triton.jit(do_not_specialize=["seed", "stream", "guidance"])
def _sampler_update_kernel(xt_ptr, out_ptr, uncond_ptr, x0_prev_ptr, x_next_ptr, x0_hat_ptr, coeffs_ptr,
                           sample_ids_ptr, seed, stream, guidance, N, PREDICTION: tl.constexpr,
                           HAS_UNCOND: tl.constexpr, HAS_X0_PREV: tl.constexpr, CLIP: tl.constexpr,
                           GROUPS: tl.constexpr):
    sample = tl.program_id(1)
    group, j, mask = tile(N, GROUPS)
    offsets = sample.to(tl.int64) * N + j
    sqrt_ab = tl.load(coeffs_ptr + 0)
    sqrt_1m_ab = tl.load(coeffs_ptr + 1)
    c_x0 = tl.load(coeffs_ptr + 2)
    c_xt = tl.load(coeffs_ptr + 4)
    sigma = tl.load(coeffs_ptr + 5)
    x = tl.load(xt_ptr + offsets, mask=mask).to(tl.float32)
    out = tl.load(out_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_UNCOND:
        uncond = tl.load(uncond_ptr + offsets, mask=mask).to(tl.float32)
        out = uncond + guidance * (out - uncond)
    if PREDICTION == 0:
        x0_hat = (x - sqrt_1m_ab * out) / sqrt_ab
    elif PREDICTION == 1:
        x0_hat = out
    else:
        x0_hat = sqrt_ab * x - sqrt_1m_ab * out
    if CLIP:
        x0_hat = tl.minimum(tl.maximum(x0_hat, -1.0), 1.0)
    x_next = c_x0 * x0_hat + c_xt * x
    if HAS_X0_PREV:
        x_next += tl.load(coeffs_ptr + 3) * tl.load(x0_prev_ptr + offsets, mask=mask).to(tl.float32)
    if sigma != 0.0:  # deterministic steps (DDIM eta=0, DPM-Solver++) skip the Philox work
        x_next += sigma * noise_tile(seed, stream, tl.load(sample_ids_ptr + sample).to(tl.uint32), group)
    tl.store(x_next_ptr + offsets, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_hat_ptr + offsets, x0_hat.to(x0_hat_ptr.dtype.element_ty), mask=mask)


def launch_sampler_update(x_t, model_out, coeffs, prediction, model_out_uncond, guidance, clip_x0, x0_prev,
                          seed, sample_ids, stream, x_next, x0_hat, *, block_size=None):
    """The fused kernel into preallocated contiguous outputs (the tests poison them first)."""
    batch, n = x_t.shape[0], x_t[0].numel()
    block = pick_block(n, block_size)
    contiguous = [t.contiguous() if t is not None else None for t in (x_t, model_out, model_out_uncond, x0_prev)]
    _sampler_update_kernel[(cdiv(n, block), batch)](
        *contiguous, x_next, x0_hat, coeffs, sample_ids, seed, stream, guidance, n,
        PREDICTION=PREDICTION_CODE[prediction], HAS_UNCOND=model_out_uncond is not None,
        HAS_X0_PREV=x0_prev is not None, CLIP=clip_x0, GROUPS=block // 4, num_warps=warps_for(block))
    return x_next, x0_hat
