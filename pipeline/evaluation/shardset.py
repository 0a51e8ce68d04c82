"""Read (a seeded random subset of) a shard set into memory for evaluation.

A set is a folder of `shard-%06d.tar` files and `manifest.json` (docs/ARCHITECTURE.md "Shard format"), local
or remote (`http(s)://HOST/DIR`, `pipe:COMMAND {name}`: see `pipeline.data.urls`).
Only the chosen samples' PNGs are decoded, so `--num 1000` on 60k images stays quick.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import shards, urls
from pipeline.evaluation import EvaluationError


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), -1 = unlabeled
    ids: torch.Tensor  # int64 (N,) global sample ids
    manifest: dict
    total: int  # samples in the whole set

    @property
    def source(self) -> str | dict | None:
        return self.manifest.get("source")


def _iterate_raw(folder: str, manifest: dict):
    """Yield raw samples (dict of bytes) in shard order, in this process only, read like the loader reads them:
    webdataset's gopen, the strict tar reader, remote shards re-read (skipping what was delivered) on failure."""
    from webdataset.tariterators import group_by_keys

    from pipeline.data.loader import files_of

    locations = [urls.join(folder, r["name"]) for r in manifest["shards"]]
    missing = [os.path.basename(p) for p in locations if not urls.is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise EvaluationError(f"shards listed in {folder}/manifest.json are missing: {missing[:3]}")
    for location in locations:
        try:
            yield from urls.read_retrying(location, lambda stream: group_by_keys(files_of(stream, location)))
        except (OSError, EOFError, ValueError) as exn:
            raise EvaluationError(f"cannot read shard {location}: {exn}") from None


def _decode(sample: dict) -> tuple[np.ndarray, int, int]:
    from PIL import Image

    if "png" not in sample:
        raise EvaluationError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no png")
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    label = int(sample["cls"].decode()) if "cls" in sample else -1
    return image, label, int(sample["__key__"])


def read_image_set(folder: Path | str, num: int | None = None, seed: int = 0) -> ImageSet:
    """All samples, or min(num, size) of them chosen uniformly without replacement by `seed`
    (same seed, same subset)."""
    folder = urls.local_path(folder)
    if not urls.is_remote(folder) and not os.path.isdir(folder):
        raise EvaluationError(f"shard set folder {folder} does not exist")
    try:
        manifest = (urls.read_manifest(urls.join(folder, shards.MANIFEST_NAME)) if urls.is_remote(folder)
                    else shards.read_manifest(folder))
    except (shards.ManifestError, urls.RemoteReadError) as error:
        raise EvaluationError(str(error)) from None
    total = sum(int(s["num_samples"]) for s in manifest["shards"])
    if num is not None and num < 1:
        raise EvaluationError(f"the number of samples to read must be positive, got {num}")
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
        raise EvaluationError(f"no samples could be read from {folder}")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise EvaluationError(f"images in {folder} differ in shape: {sorted(shapes)[:4]}")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels), torch.tensor(ids), manifest, total)
