"""The noise-prediction UNet eps_theta(x_t, t[, y]) of DDPM / improved DDPM, sized from 8x8 to 64x64.

Residual blocks with GroupNorm and a timestep (+ class) embedding added between their two convolutions,
self-attention at the resolutions listed in `attention_resolutions`, one down/up-sampling per entry of
`channel_mult` but the last, skip connections between mirrored blocks. Output layers are zero-initialised,
so a fresh model predicts 0 (a stable start for eps, x0 and v targets alike).

Class conditioning: `num_classes` real classes have ids 0..num_classes-1 and id `num_classes` is the NULL
class (the unconditional model of classifier-free guidance); `y=None` means all-null. Label dropping for
training is `drop_labels` (the trainer calls it with p_uncond).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.group_norm import group_norm_act_reference


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (int or float: the PF-ODE passes continuous t), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def num_groups(channels: int) -> int:
    """The largest of 32, 16, ..., 1 groups that divides `channels` with >= 4 channels per group where possible
    (one channel per group would be instance norm, which erases any per-channel signal added before it)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 4 or g == 1))


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm (the same parameters, so the same checkpoints), then the per-sample modulation
    h * (1 + scale) + shift when given, then SiLU when `silu`. With `fused` set (train.fused_norm,
    `use_fused_norms`) all three run as one kernel (`kernels.group_norm`: Triton on CUDA; on CPU the same torch
    ops either way): forward + backward, 8 full-tensor reads/writes instead of eager torch's 22 for a modulated norm
    and 13 for norm + SiLU (kernels/NOTES.md)."""

    def __init__(self, channels: int, silu: bool = False):
        super().__init__(num_groups(channels), channels)
        self.silu, self.fused = silu, False

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        if self.fused:
            return kernels.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift,
                                          silu=self.silu)
        return group_norm_act_reference(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift,
                                        silu=self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}, fused={self.fused}"


def norm(channels: int, silu: bool = False) -> GroupNormAct:
    return GroupNormAct(channels, silu)


def use_fused_norms(model: nn.Module, fused: bool = True) -> int:
    """Switch every GroupNormAct of `model` to the fused kernel (or back); returns how many there are."""
    norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    for m in norms:
        m.fused = fused
    return len(norms)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None):
    """y with each label replaced by `null_class` with probability p (classifier-free guidance training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path. The embedding (if emb_dim) modulates the second norm as
    GN(h) * (1 + scale) + shift (improved DDPM's scale-shift norm): a shift added BEFORE a norm would be
    partly normalised away."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float = 0.0):
        super().__init__()
        # the SiLUs live in the norms (fusable); the Identity placeholders keep the convolutions' indices, and so
        # the parameter names of existing checkpoints
        self.in_layers = nn.Sequential(norm(in_ch, silu=True), nn.Identity(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch)) if emb_dim else None
        self.out_norm = norm(out_ch, silu=True)
        self.out_layers = nn.Sequential(nn.Identity(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        scale = shift = None
        if self.emb is not None:
            scale, shift = self.emb(emb).chunk(2, dim=1)
        h = self.out_norm(self.in_layers(x), scale, shift)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (residual, output projection zero-initialised)."""

    def __init__(self, channels: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, channels_in: Sequence[int], out_ch: int, emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, out_ch, emb_dim, dropout) for c in channels_in)
        self.attn = nn.ModuleList(AttentionBlock(out_ch) if attention else nn.Identity() for _ in channels_in)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention_resolutions: Sequence[int] = (4,), dropout: float = 0.0,
                 num_classes: int | None = None, image_size: int = 8, out_channels: int | None = None):
        super().__init__()
        _check_config(in_channels, base_channels, channel_mult, num_res_blocks, dropout, num_classes, image_size)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        widths = [base_channels * m for m in channel_mult]
        resolutions = [image_size // 2 ** i for i in range(len(widths))]
        self.down, self.downsample, skips, ch = nn.ModuleList(), nn.ModuleList(), [base_channels], base_channels
        for i, (width, res) in enumerate(zip(widths, resolutions)):
            ins = [ch] + [width] * (num_res_blocks - 1)
            self.down.append(Level(ins, width, emb_dim, dropout, res in attention_resolutions))
            ch = width
            skips += [width] * num_res_blocks
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skips.append(ch)
        self.mid = Level([ch, ch], ch, emb_dim, dropout, attention=True)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            ins = []
            for _ in range(num_res_blocks + 1):
                ins.append(ch + skips.pop())
                ch = widths[i]
            self.up.append(Level(ins, widths[i], emb_dim, dropout, resolutions[i] in attention_resolutions))
            self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else nn.Identity())
        self.out = nn.Sequential(norm(ch, silu=True), nn.Identity(),
                                 zero_init(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)))

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        sinusoid = timestep_embedding(t.expand(batch) if t.dim() == 0 else t, self.base_channels)
        # computed in fp32 (precision of large t), then cast: under bf16/fp16 training the weights are low precision
        emb = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))
        if self.class_embed is None:
            if y is not None:
                raise ValueError("this UNet is unconditional (num_classes=None) but got class labels y")
            return emb
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.int64, device=emb.device)
        # checked on the host only: on CUDA the check would sync every sampling step (the embedding asserts);
        # meta tensors (FLOP counting, pipeline.flops) have no values to check
        if y.device.type == "cpu" and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        return emb + self.class_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (len(self.down) - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W) with H, W divisible by "
                             f"{factor}, got {tuple(x.shape)}")
        emb = self.embed(t, y, x.shape[0]).to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attn):
            h = attn(block(h, emb))
        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h)

    def drop_labels(self, y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.num_classes is None:
            raise ValueError("drop_labels needs a class-conditional UNet (num_classes set)")
        return drop_labels(y, p, self.num_classes, generator)


def _check_config(in_channels, base_channels, channel_mult, num_res_blocks, dropout, num_classes, image_size):
    if in_channels < 1 or base_channels < 1 or num_res_blocks < 1:
        raise ValueError("UNet: in_channels, base_channels and num_res_blocks must be >= 1")
    if len(channel_mult) < 1 or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"UNet: channel_mult must be a non-empty list of positive ints, got {channel_mult}")
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"UNet: image_size {image_size} is not divisible by 2^{len(channel_mult) - 1} "
                         f"(one halving per channel_mult entry but the last)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"UNet: num_classes must be None or >= 1, got {num_classes}")
