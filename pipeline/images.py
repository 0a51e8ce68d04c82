"""The pixel convention (8-bit levels <-> the model's [-1, 1]), image tensors <-> uint8 arrays, sample grids."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io import atomic_write_bytes
from pipeline.lazy import lazy_import

torch = lazy_import("torch")  # command modules import this one to build their parsers


PIXEL_RANGE = (-1.0, 1.0)  # what models see and produce: 8-bit level u is u / LEVEL_SCALE - 1
LEVEL_SCALE = 127.5


def to_model_range(levels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """8-bit levels 0..255 (any shape) -> floats in [-1, 1] on the 256-value grid (float32 unless `dtype`)."""
    return levels.to(dtype or torch.float32) / LEVEL_SCALE - 1.0


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (any shape; clamped) -> uint8 levels, rounding to the nearest level."""
    return ((x.clamp(*PIXEL_RANGE) + 1) * LEVEL_SCALE).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    return to_levels(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()


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
