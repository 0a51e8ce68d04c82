"""Read (a seeded random subset of) a shard set into memory for evaluation.

A set is a folder of `shard-%06d.tar` files and `manifest.json` (docs/ARCHITECTURE.md "Shard format").
Only the chosen samples' PNGs are decoded, so `--num 1000` on 60k images stays quick.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), -1 = unlabeled
    ids: torch.Tensor  # int64 (N,) global sample ids
    manifest: dict
    total: int  # samples in the whole set

    @property
    def source(self) -> str | None:
        return self.manifest.get("source")


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"shard set folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a shard set: {path.name} is missing")
    manifest = json.loads(path.read_text())
    for key in ("shards", "num_samples"):
        if key not in manifest:
            raise ValueError(f"{path} has no {key!r} field")
    return manifest


def _iterate_raw(folder: Path, manifest: dict):
    """Yield raw webdataset samples (dict of bytes) in shard order, in this process only."""
    import webdataset as wds

    urls = [str(folder / shard["name"]) for shard in manifest["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in {folder}/manifest.json are missing: {missing[:3]}")
    # nodesplitter=identity: evaluation reads the whole set even when RANK/WORLD_SIZE are set
    return iter(wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda u: u, empty_check=False))


def _decode(sample: dict) -> tuple[np.ndarray, int, int]:
    from PIL import Image

    if "png" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no png")
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    label = int(sample["cls"].decode()) if "cls" in sample else -1
    return image, label, int(sample["__key__"])


def read_image_set(folder: Path | str, num: int | None = None, seed: int = 0) -> ImageSet:
    """All samples, or min(num, size) of them chosen uniformly without replacement by `seed`
    (same seed, same subset)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    total = sum(int(s["num_samples"]) for s in manifest["shards"])
    if num is not None and num < 1:
        raise ValueError(f"the number of samples to read must be positive, got {num}")
    num = None if num is None or num >= total else num
    wanted = np.ones(total, bool) if num is None else np.zeros(total, bool)
    if num is not None:
        wanted[np.random.default_rng(seed).choice(total, size=num, replace=False)] = True
    images, labels, ids = [], [], []
    for position, sample in enumerate(_iterate_raw(folder, manifest)):
        if position < total and wanted[position]:
            image, label, sample_id = _decode(sample)
            images.append(image)
            labels.append(label)
            ids.append(sample_id)
    if not images:
        raise ValueError(f"no samples could be read from {folder}")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in shape: {sorted(shapes)[:4]}")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels), torch.tensor(ids), manifest, total)
