"""Image tensors <-> uint8 arrays, and sample grids a person can look at."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows*H, cols*W, C) uint8 array."""
    tiles = to_uint8(images)
    b, h, w, c = tiles.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, min_size: int = 256) -> Path:
    """Write a PNG grid, upscaled (nearest) so tiny images such as 8x8 digits are visible."""
    grid = make_grid(images)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
