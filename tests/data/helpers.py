"""Independent readers for the data tests: stdlib tarfile and Pillow, not the code under test."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def read_shard_folder(folder: str | Path) -> dict[str, dict]:
    """Every sample of every tar in `folder`, by key: {"png": bytes, "cls": int, "json": dict, "shard": name}."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(Path(folder).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {"shard": tar_path.name})
                entry[ext] = {"cls": lambda d: int(d), "json": json.loads}.get(ext, lambda d: d)(data)
    return samples


def png_pixels(png: bytes) -> np.ndarray:
    """HxW (L) or HxWx3 (RGB) uint8 pixels of a PNG, as Pillow reads them."""
    return np.asarray(Image.open(io.BytesIO(png)))


def denormalise(images) -> np.ndarray:
    """Loader floats in [-1, 1] back to uint8 (B, C, H, W)."""
    return ((images.numpy().astype(np.float64) + 1.0) * 127.5).round().astype(np.uint8)


def epoch_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch.keys]
