"""Controlled degradations of real uint8 image batches (N, C, H, W): the ground truth that a sample-quality
metric must rank correctly (held-out real < noised < blurred < shuffled pixels; one class loses recall)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Gaussian pixel noise of std `sigma` (in [0, 1] units), clipped back to uint8."""
    gen = torch.Generator().manual_seed(seed)
    noisy = images.float() + torch.randn(images.shape, generator=gen) * (255.0 * sigma)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def blur(images: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Box blur with a (2 radius + 1)^2 window, edges replicated."""
    size = 2 * radius + 1
    x = F.pad(images.float(), (radius,) * 4, mode="replicate")
    return F.avg_pool2d(x, size, stride=1).round().to(torch.uint8)


def shuffle_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels permuted at random: the same intensity histogram, no structure."""
    gen = torch.Generator().manual_seed(seed)
    flat = images.flatten(1)
    order = torch.argsort(torch.rand(flat.shape, generator=gen), dim=1)
    return flat.gather(1, order).reshape(images.shape)


def one_class(images: torch.Tensor, labels: torch.Tensor, keep: int, count: int, seed: int = 0) -> torch.Tensor:
    """A mode-collapsed set: `count` images drawn (with replacement) from class `keep` only."""
    pool = images[labels == keep]
    if len(pool) == 0:
        raise ValueError(f"no image has label {keep}")
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (count,), generator=gen)]
