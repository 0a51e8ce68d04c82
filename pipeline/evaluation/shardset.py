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

from pipeline.data import shards, urls
from pipeline.evaluation import EvaluationError
from pipeline.lazy import lazy_import

torch = lazy_import("torch")  # `evaluate` checks set sizes before torch loads


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
    """Samples of every shard in manifest order, through the loader's strict reader (`ShardRead`: remote
    shards re-read on a dropped connection); a damaged set is an error, since a metric over a silently
    different set would mislead."""
    from pipeline.data.loader import ShardRead

    specs = shards.shard_specs(folder, manifest, join=urls.join)
    missing = [os.path.basename(s.path) for s in specs if not urls.is_remote(s.path) and not os.path.isfile(s.path)]
    if missing:
        raise EvaluationError(f"shards listed in {folder}/manifest.json are missing: {missing[:3]}")
    for spec in specs:
        read = ShardRead(spec)
        yield from read
        report = read.report
        if report.lost or report.damage or report.ignored:
            raise EvaluationError(f"{spec.path} is damaged ({report.summary()}); evaluation needs an intact "
                                  "set: re-create it (prepare / generate)")


def _decode(sample: dict) -> tuple[np.ndarray, int, int]:
    from PIL import Image

    try:
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    except Exception as exn:  # Pillow raises OSError, SyntaxError, ValueError... on damaged PNG data
        raise EvaluationError(f"sample {sample['__key__']} in {sample['__url__']}: undecodable png "
                              f"({type(exn).__name__}: {exn})") from None
    image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return image, sample["__label__"], int(sample["__key__"])


def _manifest(folder: str) -> dict:
    if not urls.is_remote(folder) and os.path.exists(folder) and not os.path.isdir(folder):
        raise EvaluationError(f"{folder} is a file; a shard set is a folder with manifest.json")
    if not urls.is_remote(folder) and not os.path.isdir(folder):
        raise EvaluationError(f"shard set folder {folder} does not exist")
    try:
        return (urls.read_manifest(urls.join(folder, shards.MANIFEST_NAME)) if urls.is_remote(folder)
                else shards.read_manifest(folder))
    except (shards.ManifestError, urls.RemoteReadError) as error:
        raise EvaluationError(str(error)) from None


def set_size(folder: Path | str) -> int:
    """The number of samples a shard set's manifest lists."""
    return _manifest(urls.local_path(folder))["num_samples"]


def read_image_set(folder: Path | str, num: int | None = None, seed: int = 0) -> ImageSet:
    """All samples, or min(num, size) of them chosen uniformly without replacement by `seed`
    (same seed, same subset)."""
    folder = urls.local_path(folder)
    manifest = _manifest(folder)
    total = manifest["num_samples"]
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
