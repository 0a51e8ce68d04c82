"""Real data and real shard sets for the evaluation tests."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch


def write_shard_set(folder: Path, images: np.ndarray, labels: np.ndarray, source: str, per_shard: int = 500):
    """A shard set as ARCHITECTURE.md "Shard format" describes it, written with webdataset's TarWriter."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True)
    shards = []
    for shard_index, start in enumerate(range(0, len(images), per_shard)):
        name = f"shard-{shard_index:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                png = io.BytesIO()
                Image.fromarray(images[i, 0]).save(png, format="PNG")
                sink.write({"__key__": f"{i:09d}", "png": png.getvalue(), "cls": str(int(labels[i])),
                            "json": json.dumps({"source_index": i})})
        shards.append({"name": name, "num_samples": min(per_shard, len(images) - start),
                       "bytes": (folder / name).stat().st_size, "sha256": ""})
    manifest = {"format": "webdataset-png-v1", "source": source, "image_size": list(images.shape[-2:]),
                "channels": 1, "class_names": [str(c) for c in range(10)], "num_samples": len(images),
                "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
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
