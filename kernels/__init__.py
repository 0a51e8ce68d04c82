"""Fused Triton kernels for diffusion training and sampling, each beside its plain-torch reference.

- `q_sample`: x_t from x0 with counter-based noise drawn in-kernel (kernel A).
- `diffusion_loss`: loss + per-sample + bucket sums and the gradient in one pass (kernel B).
- `sampler_update`: one fused DDPM / DDIM / DPM-Solver++(2M) step with CFG, clipping and noise.
- `modulated_layer_norm`, `gated_residual`: a DiT block's adaLN ops, forward and backward.
- `group_norm_act`: a UNet block's GroupNorm + scale-shift + SiLU, forward and backward.
- `noise.randn`: the counter-based noise every kernel draws (the determinism contract).
Triton runs on CUDA tensors, the torch reference otherwise; see `kernels.dispatch` for the overrides.
"""
from . import noise
from .adaln import gated_residual, modulated_layer_norm
from .fused_loss import LossOutput, diffusion_loss, q_sample
from .group_norm import group_norm_act
from .sampler_update import sampler_update

__all__ = ["noise", "q_sample", "diffusion_loss", "LossOutput", "sampler_update", "modulated_layer_norm",
           "gated_residual", "group_norm_act"]
