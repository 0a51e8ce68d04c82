"""Writing a generation: this task's shards, each followed by its done record, and the manifest kept current.

A rerun skips done shards and regenerates the rest, overwriting any half-written file, so a killed run loses
nothing and duplicates nothing. Batches never straddle shards, so a shard's bytes do not depend on how the
shards were split between tasks or ranks.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline.data import shards
from pipeline.generation.plan import DoneRecords, done_path, rebuild_manifest, shard_ids
from pipeline.generation.sampling import class_labels, sample_batches
from pipeline.generation.settings import Sampling

MANIFEST_INTERVAL_S = 30.0  # rebuild the manifest at most this often while running (always at the end)


def write_shards(samples_of: Callable[[range], Iterator[dict]], spec: dict, out: Path, done: DoneRecords,
                 todo: list[int], progress: bool, publish: Callable[[dict], None] | None = None,
                 desc: str = "generate") -> None:
    """Write the shards `todo` of the set `spec` into `out`, each followed by its done record (then handed to
    `publish`, which uploads it when --out is remote); `samples_of(ids)` gives the shard-format samples of a
    shard's global sample ids (`shard_samples` for generation, latents for `encode`)."""
    from tqdm import tqdm

    count = sum(len(shard_ids(s, spec["num_samples"], spec["shard_size"])) for s in todo)
    last_manifest = time.monotonic()
    with tqdm(total=count, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for shard in todo:
            done.forget(shard)
            _remove_partial_files(out, shard)
            ids = shard_ids(shard, spec["num_samples"], spec["shard_size"])
            record = shards.write_shard(out / (shards.SHARD_PATTERN % shard),
                                        _counted(samples_of(ids), bar))
            record.update(first_id=ids.start, status="done")
            shards.atomic_write_bytes(done_path(out, shard), json.dumps(record, sort_keys=True).encode())
            if publish:
                publish(record)
            if time.monotonic() - last_manifest > MANIFEST_INTERVAL_S:
                rebuild_manifest(out, spec, done)
                last_manifest = time.monotonic()


def shard_samples(inference, sampling: Sampling, ids: range, batch_size: int) -> Iterator[dict]:
    """The shard-format samples of `ids`: png, cls (the class conditioned on, -1 if none), json metadata."""
    from pipeline.images import to_uint8

    meta = {**sampling.record(), "model_hash": inference.model_hash}
    del meta["classes"]  # each sample's own class is its cls
    for batch, images in sample_batches(inference, sampling, ids, batch_size):
        labels = class_labels(batch, sampling.classes)
        for row, (sample_id, image) in enumerate(zip(batch, to_uint8(images))):
            cls = -1 if labels is None else int(labels[row])
            yield shards.make_sample(sample_id, shards.encode_png(image), cls,
                                     {"source_index": sample_id, "sample_id": sample_id, **meta})


def _counted(samples: Iterator[dict], bar) -> Iterator[dict]:
    for sample in samples:
        bar.update(1)
        yield sample


def _remove_partial_files(out: Path, shard: int) -> None:
    """Temporary files a killed writer of this shard left behind (only this shard's: others may be live)."""
    record = done_path(out, shard)
    for tmp in [*out.glob(f".{shards.SHARD_PATTERN % shard}.*.tmp"), *record.parent.glob(f".{record.name}.*.tmp")]:
        tmp.unlink(missing_ok=True)
