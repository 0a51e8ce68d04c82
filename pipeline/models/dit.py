"""A diffusion transformer (DiT, Peebles & Xie 2023): the DDPM's denoiser when `model.network: dit`.

Patchify (a p x p stride-p convolution) -> tokens + fixed 2-D sin-cos positions -> transformer blocks with
adaLN-Zero conditioning -> a modulated final LayerNorm and linear layer -> unpatchify. Works on images and on
VAE latents alike: it only sees (B, C, H, W) with p dividing H and W.

adaLN-Zero: the conditioning c = embed(t) + embed(y) produces, per block, shift/scale/gate vectors for the
attention and MLP branches; the layers that produce them and the output layer start at zero, so every block
starts as the identity and a fresh model predicts 0 (as the UNet). The LayerNorm + modulation and the gated
residuals go through the fused ops of `kernels.adaln` (Triton on CUDA, the torch reference on CPU).

Same interface as the UNet: `DiT(...)(x_t, t, y=None)`; y = `num_classes` is the null class of classifier-free
guidance and `y=None` means all-null.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from pipeline.models.unet import drop_labels, timestep_embedding, zero_init


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """(height * width, dim) fixed 2-D sin-cos position embedding: half the channels encode the row, half the
    column (each as cos/sin over geometric frequencies)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (rows, cols) for f in (torch.cos, torch.sin)]
    return F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter)).to(torch.float32)


class Block(nn.Module):
    """x + gate_a * Attn(adaLN(x)), then x + gate_m * MLP(adaLN(x)); six modulation vectors from c."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.modulation = zero_init(nn.Linear(hidden, 6 * hidden))

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = kernels.gated_residual(x, gate_a, self.attention(kernels.modulated_layer_norm(x, shift_a, scale_a)))
        return kernels.gated_residual(x, gate_m, self.mlp(kernels.modulated_layer_norm(x, shift_m, scale_m)))


class DiT(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 8, patch_size: int = 2,
                 hidden: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 num_classes: int | None = None, time_dim: int = 256):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        check_dit(height, width, patch_size, hidden, heads, depth, num_classes)
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.grid = (height // patch_size, width // patch_size)
        self.time_dim = time_dim
        self.patchify = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("positions", sincos_positions(*self.grid, hidden))
        self.time_embed = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_modulation = zero_init(nn.Linear(hidden, 2 * hidden))
        self.out = zero_init(nn.Linear(hidden, patch_size * patch_size * in_channels))

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        sinusoid = timestep_embedding(t.expand(batch) if t.dim() == 0 else t, self.time_dim)
        c = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))  # fp32 sinusoid, then the weights' dtype
        if self.class_embed is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=None) but got class labels y")
            return c
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.int64, device=c.device)
        if y.device.type == "cpu" and (y.min() < 0 or y.max() > self.num_classes):  # host only: no per-step sync
            raise ValueError(f"class ids must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        return c + self.class_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        p, (gh, gw) = self.patch_size, self.grid
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, gh * p, gw * p):
            raise ValueError(f"DiT expects x of shape (B, {self.in_channels}, {gh * p}, {gw * p}), "
                             f"got {tuple(x.shape)}")
        b, c = x.shape[0], self.in_channels
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.positions.to(x.dtype)
        cond = self.embed(t, y, b).to(x.dtype)
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_modulation(F.silu(cond)).chunk(2, dim=1)
        patches = self.out(kernels.modulated_layer_norm(tokens, shift, scale))  # (B, gh*gw, p*p*c)
        return patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)

    def drop_labels(self, y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.num_classes is None:
            raise ValueError("drop_labels needs a class-conditional DiT (num_classes set)")
        return drop_labels(y, p, self.num_classes, generator)


def check_dit(height, width, patch_size, hidden, heads, depth, num_classes):
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"DiT: patch size {patch_size} does not divide the {height}x{width} input")
    if heads < 1 or hidden % heads or depth < 1:
        raise ValueError(f"DiT: hidden size {hidden} must be divisible by heads {heads}, depth >= 1 (got {depth})")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"DiT: num_classes must be None or >= 1, got {num_classes}")
