"""`python -m pipeline encode`: an image shard set -> a latent shard set through a trained VAE.

The output is a generation-style folder (the planning, done records, folder claim and manifest of
`pipeline.generation.plan` are reused as they are): shard s holds the samples at positions [s * K, (s + 1) * K) of the
input set (in its manifest's order), so the split over array tasks (`--task-index/--num-tasks`) and ranks
(RANK/WORLD_SIZE) changes nothing in the bytes; a rerun skips finished shards.

Each sample: key `%09d` (its position: the global sample id), `npy` (the latent, float32 (C, h, w), scaled),
`cls` (the input's label) and `json` (source_index, source_key). The latent is deterministic: the posterior
mean of q(z | x), multiplied by `scale_factor` = 1 / std of the posterior means of the first
SCALE_SAMPLES samples, so the latent set has unit variance (as the DDPM's N(0, I) prior expects). The
manifest's `generator` records the VAE's hash, the latent shape and the scale factor; a latent DDPM decodes
x / scale_factor.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pipeline.data import destination, shards
from pipeline.generation import settings as settings_module
from pipeline.generation.plan import (SPEC_NAME, DoneRecords, GenerateError, assigned_shards, check_split,
                                      claim_folder, num_shards, rank_from_env, rebuild_manifest)
from pipeline.generation.settings import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, CHECKPOINT_HELP, flag
from pipeline.images import to_model_range
from pipeline.lazy import lazy_import

torch = lazy_import("torch")  # loaded on first use, so `--help` and flag errors answer at once

SPEC_FORMAT = "pipeline-latents/1"
SCALE_SAMPLES = 1024  # posterior means the scale factor is measured on (the set's first samples)


@dataclass(frozen=True, kw_only=True)
class EncodeSettings:
    """`python -m pipeline encode`: the flags, declared once (see pipeline.generation.settings)."""
    vae: str = flag("the VAE: " + CHECKPOINT_HELP)
    data: str = flag("the image shard folder (with manifest.json) to encode")
    out: str = flag("output folder: shard-%%06d.tar of latents, manifest.json, generation.json")
    shard_size: int = flag(f"samples per output shard (default {DEFAULT_SHARD_SIZE}); shard s holds the input's "
                           "samples [s*K, (s+1)*K)", DEFAULT_SHARD_SIZE)
    task_index: int = flag("this task's index k: it writes shards k, k+n, ...", 0)
    num_tasks: int = flag("number of tasks n splitting the shards", 1)
    batch_size: int = flag(f"images per VAE forward pass (default {DEFAULT_BATCH_SIZE})", DEFAULT_BATCH_SIZE)
    device: Optional[str] = flag("torch device (default: cuda:$LOCAL_RANK if available, else cpu)", None)
    verify: bool = flag("check the sha256 of finished shards and redo those that differ", False)
    progress: bool = flag("hide the progress bar", True, flag="--no-progress", action="store_false")

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise EncodeError(f"--shard-size and --batch-size must be >= 1, got {self.shard_size}, {self.batch_size}")


class EncodeError(GenerateError):
    """Bad input to `encode` (the VAE, the data set, the output folder): the message names it."""


def load_vae(path: str, device: str):
    from pipeline.generation.sampling import load_of_type

    return load_of_type(path, device, model_type="vae", flag="--vae", error=EncodeError)


class InputSet:
    """The input shard set read by position: samples [start, stop) in manifest order."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.manifest = shards.read_manifest(self.folder)
        except shards.ManifestError as exn:
            raise EncodeError(f"--data {folder}: {exn}") from None
        self.counts = [int(s["num_samples"]) for s in self.manifest["shards"]]
        self.paths = shards.shard_paths(self.folder, self.manifest)
        self.total = sum(self.counts)
        if self.total == 0:
            raise EncodeError(f"--data {folder} holds no samples")

    def fingerprint(self) -> str:
        """The input's identity: its shards' names and sha256 (a rerun over other data is refused)."""
        import hashlib

        names = "".join(f"{s['name']}:{s['sha256']};" for s in self.manifest["shards"])
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def samples(self, positions: range) -> Iterator[dict]:
        """Raw samples (dicts of bytes) at `positions`, reading only the shards that hold them."""
        import webdataset as wds

        offsets = np.cumsum([0, *self.counts])
        chosen = [i for i in range(len(self.paths)) if offsets[i] < positions.stop and offsets[i + 1] > positions.start]
        if not chosen:
            return
        # nodesplitter=identity: this process reads exactly the shards it was given, whatever RANK says
        stream = wds.WebDataset([str(self.paths[i]) for i in chosen], shardshuffle=False,
                                nodesplitter=lambda urls: urls, empty_check=False)
        for position, sample in enumerate(stream, start=int(offsets[chosen[0]])):
            if position >= positions.stop:
                return
            if position >= positions.start:
                yield sample


def images_of(samples: list[dict], vae) -> torch.Tensor:
    """Decoded PNGs as float (B, C, H, W) in [-1, 1] at the VAE's image size and channels."""
    from pipeline.data.loader import decode_image

    size = (vae.image_size, vae.image_size)
    arrays = [decode_image(s["png"], size, vae.in_channels) for s in samples]
    return to_model_range(torch.from_numpy(np.stack(arrays)))


def posterior_means(vae, samples: list[dict], batch_size: int) -> torch.Tensor:
    device = next(vae.parameters()).device
    with torch.no_grad():
        means = [vae.encode(images_of(samples[i:i + batch_size], vae).to(device))[0].float().cpu()
                 for i in range(0, len(samples), batch_size)]
    return torch.cat(means)


def measure_scale_factor(vae, data: InputSet, batch_size: int) -> float:
    sample = list(data.samples(range(0, min(SCALE_SAMPLES, data.total))))
    return float(1.0 / posterior_means(vae, sample, batch_size).double().std())


def npy_bytes(latent: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(latent, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def latent_samples(vae, data: InputSet, ids: range, scale: float, batch_size: int) -> Iterator[dict]:
    stream, position = data.samples(ids), ids.start
    while batch := list(itertools.islice(stream, batch_size)):
        latents = posterior_means(vae, batch, batch_size) * scale
        for sample, latent in zip(batch, latents.numpy()):
            meta = {"source_index": position, "source_key": sample["__key__"]}
            yield {"__key__": f"{position:09d}", "npy": npy_bytes(latent), "cls": sample.get("cls", b"-1"),
                   "json": json.dumps(meta, sort_keys=True).encode()}
            position += 1


def make_spec(vae_inference, data: InputSet, shard_size: int, scale: float) -> dict:
    vae = vae_inference.model
    latent_shape = [vae.latent_channels, vae.latent_size, vae.latent_size]
    generator = {"vae_hash": vae_inference.model_hash, "latent_shape": latent_shape, "scale_factor": scale,
                 "data": data.fingerprint(), "latent": "posterior_mean"}
    return {"format": SPEC_FORMAT, "generator": generator, "num_samples": data.total, "shard_size": shard_size,
            "source": {"kind": "latents", "vae": str(vae_inference.path), "data": str(data.folder),
                       "data_source": data.manifest.get("source")},
            "image_size": latent_shape[1:], "channels": latent_shape[0],
            "class_names": data.manifest.get("class_names", [])}


def encode(settings: EncodeSettings) -> dict:
    """Encode this task's (and rank's) shards of the latent set into `settings.out`; returns the manifest."""
    from pipeline.generation.sampling import default_device
    from pipeline.generation.writing import write_shards

    rank, world_size = rank_from_env()
    data = InputSet(settings.data)
    total = num_shards(data.total, settings.shard_size)
    check_split(total, settings.task_index, settings.num_tasks, rank, world_size)
    inference = load_vae(settings.vae, settings.device or default_device())
    out = destination.local_folder(settings.out)  # a URL is refused here, as by generate
    existing = out / SPEC_NAME
    # the folder's factor when it has one: a task on another device must not measure a slightly different one
    scale = (json.loads(existing.read_text())["generator"].get("scale_factor") if existing.is_file()
             else measure_scale_factor(inference.model, data, settings.batch_size))
    spec = make_spec(inference, data, settings.shard_size, scale)
    claim_folder(out, spec)
    done = DoneRecords(out)
    done.refresh()
    mine = assigned_shards(total, settings.task_index, settings.num_tasks, rank, world_size)
    todo = [s for s in mine if not done.is_done(s, settings.verify)]
    write_shards(lambda ids: latent_samples(inference.model, data, ids, scale, settings.batch_size), spec, out,
                 done, todo, settings.progress, desc="encode")
    return rebuild_manifest(out, spec, done)


def add_arguments(p: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(p, EncodeSettings)


def run(args: argparse.Namespace) -> int:
    settings = EncodeSettings(**{f.name: getattr(args, f.name) for f in fields(EncodeSettings)})
    m = encode(settings)
    g = m["generator"]
    print(f"task {settings.task_index}/{settings.num_tasks}: {settings.out} holds {len(m['shards'])}/"
          f"{m['num_shards_planned']} shards ({m['num_samples']} of {m['num_samples_planned']} latents "
          f"{tuple(g['latent_shape'])}, scale factor {g['scale_factor']:.4f}){'' if m['complete'] else ', incomplete'}")
    return 0
