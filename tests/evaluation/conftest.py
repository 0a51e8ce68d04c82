"""Real data and real shard sets for the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import shards


def write_shard_set(folder: Path, images: torch.Tensor, labels: torch.Tensor, source: dict,
                    per_shard: int = 400) -> Path:
    """uint8 images (N, 1, H, W) as a shard set, through the project's ShardWriter and manifest."""
    with shards.ShardWriter(folder, max_count=per_shard) as writer:
        for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
            writer.add(shards.make_sample(i, shards.encode_png(image[0]), label, {"source_index": i}))
    manifest = shards.make_manifest(source=source, image_size=images.shape[-2:], channels=1,
                                    class_names=[str(c) for c in range(10)], shards=writer.records)
    shards.write_manifest(folder, manifest)
    return folder


@pytest.fixture(scope="session")
def digits_halves():
    """sklearn's 1797 real digits as uint8 (N, 1, 8, 8), split at random into two disjoint halves."""
    from pipeline.evaluation.train_classifier import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    images, labels = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    order = np.random.default_rng(1).permutation(len(images))
    half = len(images) // 2
    first, second = order[:half], order[half:]
    return (torch.from_numpy(images[first]), torch.from_numpy(labels[first]),
            torch.from_numpy(images[second]), torch.from_numpy(labels[second]))
