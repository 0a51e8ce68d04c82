"""Streaming loader over the shard format: split by node and worker, seeded shuffle, exact resume.

How a stream is built. The shards are the *units of reading*; the (rank, worker) pairs are the *units of
work* (`units = world_size * workers`, unit = rank * workers + worker). For epoch e:
- finite mode: the shard list is permuted by (seed, e), the same on every rank. With at least as many
  shards as units, unit u reads shards u, u+units, ... of that order. With fewer shards than units (a small
  data set on many ranks x workers), every unit reads every shard and keeps the samples whose position in
  the epoch's stream is u modulo units, so no unit idles and every sample is still seen exactly once.
- resampled mode (`resampled=True`, for multi-node training): each unit draws ceil(shards/units) shards
  with replacement, seeded by (seed, e, unit), and goes on to epoch e+1 by itself: an infinite stream.
Each unit then shuffles its samples through a buffer seeded by (seed, e, unit), decodes them, and emits
batches; torch's DataLoader merges the workers round-robin.

Resume. A batch carries its worker's position: how many raw samples it has taken from its shuffled
stream. `state_dict()` records, per worker, the position of the last batch handed out, and which worker
comes next. Restoring rebuilds each worker's stream for its epoch, skips that many raw samples (reading
the tar, not decoding) and starts DataLoader's round-robin at the right worker, so the batches that follow
are exactly those an uninterrupted run would have produced (for the same world size and worker count).

Bad data. At the start the shard folder is checked against its manifest (`verify`: "size" stats every
shard and looks for unlisted ones, "sha256" also hashes every shard, "off" skips it): a mismatch is a
LoaderError. While reading, `shards.read_shard` (the one strict reader) delivers only complete samples
whose key is one of the shard's ids and whose label the manifest allows, each at most once, and
resynchronises after a damaged tar header; the samples of a shard it could not deliver are counted
exactly (manifest count - delivered) and logged with their keys, as are samples whose PNG does not decode.
More bad than `max_bad_fraction` of the samples raises TooManyBadSamples.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import shards as shard_format
from pipeline.data import urls
from pipeline.errors import PipelineError
from pipeline.images import to_model_range

logger = logging.getLogger(__name__)
FITS = ("resize", "pad")
STATE_VERSION = 1
MIN_SAMPLES_FOR_RUNNING_CHECK = 1000  # when the expected count is unknown, wait this long before judging


class LoaderError(PipelineError, ValueError):
    """The loader cannot start: a path or pattern matching nothing, or a bad argument."""


class TooManyBadSamples(PipelineError, RuntimeError):
    """More than `max_bad_fraction` of the samples were corrupt, undecodable or lost to truncated shards."""


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, C, H, W): images in [-1, 1], or latents as stored
    labels: torch.Tensor  # int64 (B,), -1 for unlabeled samples
    keys: list[str]  # the samples' keys (global sample ids, `%09d`)


ShardInfo = shard_format.ShardSpec  # a shard as its manifest describes it (path, count, ids, classes, size)


# ---------------------------------------------------------------- finding shards
def resolve_shards(path: str | os.PathLike, verify: str = "size",
                   timeout_s: float = urls.DEFAULT_TIMEOUT_S) -> list[ShardInfo]:
    """Shards of a folder (from its manifest), of a brace/glob pattern, or of a URL (`pipeline.data.urls`),
    local ones checked against their manifest at level `verify`; a clear error if none exist or they
    disagree with the manifest."""
    path = urls.local_path(path)
    if urls.is_remote(path):
        return remote_specs(path, timeout_s)
    if os.path.isdir(path):
        manifest = shard_format.read_manifest(path)
        found = shard_format.shard_specs(path, manifest)
        missing = [s.path for s in found if not os.path.isfile(s.path)]
        if missing:
            raise LoaderError(f"{len(missing)} shard(s) listed in {path}/manifest.json are missing, e.g. {missing[0]}")
        if not found:
            raise LoaderError(f"the manifest in {path} lists no shards")
        problems = shard_format.verify_shards(path, manifest, verify)
    else:
        try:
            found = specs_from_manifests(urls.expand(path))
        except urls.RemoteReadError as exn:
            raise LoaderError(str(exn)) from None
        listed = [s for s in found if s.num_samples is not None and verify != "off"]
        problems = [p for p in (shard_format.check_shard_file(s, verify) for s in listed) if p]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoaderError(f"shards of {path} do not match their manifest (verify={verify}): "
                          f"{'; '.join(problems[:3])}{more}. Re-create them (prepare / generate), or set "
                          "data.verify=off to read what is there (lost samples count against max_bad_fraction)")
    return found


def remote_specs(path: str, timeout_s: float) -> list[ShardInfo]:
    """Shards of a remote folder as its manifest describes them (ids and classes too, so the reader can
    check keys and labels); of a remote pattern with the counts `urls.remote_shards` finds."""
    if not urls.is_folder(path):
        return [ShardInfo(url, count) for url, count in urls.remote_shards(path, timeout_s)]
    manifest = urls.read_manifest(urls.join(path, shard_format.MANIFEST_NAME), timeout_s)
    found = shard_format.shard_specs(path, manifest, join=urls.join)
    if not found:
        raise LoaderError(f"the manifest of {path} lists no shards")
    urls.check_readable(found[0].path, timeout_s)
    return found


def specs_from_manifests(names: list[str]) -> list[ShardInfo]:
    """Each local shard as a manifest beside it describes it; only its path when no manifest lists it (then
    its losses cannot be counted exactly)."""
    by_folder: dict[str, dict[str, ShardInfo]] = {}
    specs = []
    for name in names:
        folder = os.path.dirname(name) or "."
        if folder not in by_folder:
            try:
                by_folder[folder] = {os.path.basename(s.path): s for s in shard_format.shard_specs(folder)}
            except shard_format.ManifestError:
                by_folder[folder] = {}
        listed = by_folder[folder].get(os.path.basename(name))
        specs.append(ShardInfo(name) if listed is None else replace(listed, path=name))
    return specs


# ---------------------------------------------------------------- decoding
def image_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """`resolution` as (height, width): an int means a square image."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    return int(h), int(w)


def decode_image(png: bytes, resolution: int | Sequence[int], channels: int, fit: str = "resize") -> np.ndarray:
    """PNG bytes -> uint8 (C, H, W) at `resolution` (an int, or (height, width)) with `channels` (1 = L, 3 = RGB).

    An image already at the resolution and channel count comes back bit-exact. `fit="resize"` scales
    the image to cover the target (bicubic) and centre-crops; `fit="pad"` centre-pads with black
    (or centre-crops when larger) without resampling.
    """
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, the config asks for {channels} (more are for latent sets)")
    img = Image.open(io.BytesIO(png))
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:  # convert() copies even when the mode already matches: skip it then
        img = img.convert(mode)
    h, w = image_size(resolution)
    if img.size != (w, h):
        img = resize_and_crop(img, h, w) if fit == "resize" else pad_or_crop(img, h, w)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_latent(npy: bytes, resolution: int | Sequence[int], channels: int) -> np.ndarray:
    """A latent sample's float32 (C, h, w) array; it must already have the configured shape."""
    latent = np.load(io.BytesIO(npy), allow_pickle=False)
    expected = (channels, *image_size(resolution))
    if latent.shape != expected:
        raise ValueError(f"latent of shape {latent.shape}, the config expects {expected} "
                         "(data.channels, data.resolution, data.width)")
    return latent.astype(np.float32, copy=False)


def to_batch(samples: list[np.ndarray]) -> torch.Tensor:
    """Stacked samples as float32: uint8 images mapped to [-1, 1], float latents as they are."""
    stacked = torch.from_numpy(np.stack(samples))
    return to_model_range(stacked) if stacked.dtype == torch.uint8 else stacked.float()


def resize_and_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    scale = max(w / img.width, h / img.height)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((sw, sh), Image.Resampling.BICUBIC)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def pad_or_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    canvas = Image.new(img.mode, (w, h), 0)
    canvas.paste(img, ((w - img.width) // 2, (h - img.height) // 2))  # negative offsets crop
    return canvas


def flip_this(seed: int, epoch: int, key: str) -> bool:
    """Seeded coin per (seed, epoch, sample key): independent of rank, worker and batch layout."""
    return hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=1).digest()[0] & 1 == 1


def seeded_rng(*parts: Any) -> random.Random:
    # A str seed is hashed with sha512 by `random`: stable across processes and PYTHONHASHSEED.
    return random.Random(":".join(map(str, parts)))


# ---------------------------------------------------------------- planning an epoch
@dataclass
class UnitPlan:
    """What one (rank, worker) unit reads in one epoch."""

    shards: list[ShardInfo]
    reports: list[bool]  # whether this unit reports the read errors of each shard (one unit per shard does)
    sample_split: tuple[int, int] | None = None  # (units, unit): keep stream positions == unit mod units

    def expected(self) -> int | None:
        counts = [s.num_samples for s in self.shards]
        if None in counts:
            return None
        if self.sample_split is None:
            return sum(counts)
        units, unit = self.sample_split
        return len(range(unit, sum(counts), units))


def plan_unit(shards: list[ShardInfo], *, seed: int, epoch: int, unit: int, units: int,
              resampled: bool) -> UnitPlan:
    if resampled:
        rng = seeded_rng(seed, epoch, unit, "resample")
        picks = [shards[rng.randrange(len(shards))] for _ in range(math.ceil(len(shards) / units))]
        return UnitPlan(picks, [True] * len(picks))
    order = list(range(len(shards)))
    seeded_rng(seed, epoch, "shard-order").shuffle(order)
    if len(shards) >= units:
        mine = [shards[i] for i in order[unit::units]]
        return UnitPlan(mine, [True] * len(mine))
    reports = [position % units == unit for position in range(len(order))]
    return UnitPlan([shards[i] for i in order], reports, (units, unit))


# ---------------------------------------------------------------- one unit's stream (runs in a worker)
@dataclass
class BadEvent:
    key: str
    reason: str
    count: int  # samples lost (a truncated shard loses several)
    epoch: int
    at: int  # raw samples the unit had taken from its shuffled stream of that epoch when this happened


@dataclass
class Item:
    """What a worker sends: a batch (maybe empty) plus its position and the bad samples met since the last."""

    worker: int
    epoch: int
    consumed: int
    done: bool
    images: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    bad: list[BadEvent] = field(default_factory=list)


@dataclass
class Progress:
    """A unit's position: its epoch and the raw samples taken from that epoch's shuffled stream."""

    epoch: int
    consumed: int = 0


class ShardRead:
    """One shard through the strict reader (`shards.read_shard`), a remote one re-read from its start when the
    read fails part-way (`urls.read_retrying` skips what was delivered). Iterate it for the samples; then
    `report` says exactly what the shard could not deliver. Loader and evaluation both read this way."""

    def __init__(self, shard: ShardInfo, retries: int = urls.DEFAULT_RETRIES,
                 timeout_s: float = urls.DEFAULT_TIMEOUT_S):
        self.shard, self.retries, self.timeout_s = shard, retries, timeout_s
        self.attempts: list[shard_format.ShardReport] = []  # one report per read of the stream
        self.error: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from urls.read_retrying(self.shard.path, self._parse, retries=self.retries,
                                          timeout_s=self.timeout_s)
        except (EOFError, OSError) as exn:  # cut short, or unreadable after the retries: the rest is lost
            self.error = f"{type(exn).__name__}: {exn}"

    def _parse(self, stream: Any) -> Iterator[dict[str, Any]]:
        self.attempts.append(shard_format.ShardReport(self.shard))
        return shard_format.read_shard(stream, self.shard, self.attempts[-1])

    @property
    def report(self) -> shard_format.ShardReport:
        # Every read yields the same samples in the same order: the longest one saw all that was delivered.
        report = max(self.attempts, key=lambda r: len(r.delivered), default=shard_format.ShardReport(self.shard))
        return replace(report, damage=report.damage + [self.error] if self.error else report.damage)


def read_plan(plan: UnitPlan, events: list[BadEvent], progress: Progress, retries: int = urls.DEFAULT_RETRIES,
              timeout_s: float = urls.DEFAULT_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """Samples of the plan's shards, in order, from the strict reader; what a shard could not deliver
    becomes one BadEvent (counting its lost samples exactly), never an exception."""
    position = 0
    for shard, reports in zip(plan.shards, plan.reports):
        read = ShardRead(shard, retries, timeout_s)
        for sample in read:
            if plan.sample_split is None or position % plan.sample_split[0] == plan.sample_split[1]:
                yield sample
            position += 1
        report = read.report
        if reports and (report.lost or report.damage or report.ignored):
            events.append(BadEvent(urls.file_name(shard.path), report.summary(), report.lost, progress.epoch,
                                   progress.consumed))


@dataclass
class StreamConfig:
    shards: list[ShardInfo]
    batch_size: int
    resolution: tuple[int, int]  # (height, width)
    channels: int
    fit: str
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (1 when num_workers == 0)
    shuffle_buffer: int
    hflip: bool
    resampled: bool
    retries: int = urls.DEFAULT_RETRIES  # re-reads of a remote shard that fails part-way
    timeout_s: float = urls.DEFAULT_TIMEOUT_S  # a remote read idle this long counts as dropped


class UnitStream(torch.utils.data.IterableDataset):
    """The per-worker iterable handed to DataLoader: each worker plays one logical worker.

    `rotation` shifts DataLoader worker i to logical worker (i + rotation) % workers, so a resumed run's
    round-robin starts at the worker that was due next.
    """

    def __init__(self, config: StreamConfig, positions: list[dict[str, Any]], rotation: int):
        super().__init__()
        self.config, self.positions, self.rotation = config, positions, rotation

    def __iter__(self) -> Iterator[Item]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else (info.id + self.rotation) % self.config.workers
        start = self.positions[worker]
        if start["done"]:
            return
        resume = (start["epoch"], start["consumed"])
        progress, events = Progress(start["epoch"]), []
        images, labels, keys = [], [], []

        def emit(done: bool) -> Item:
            # Events before the restored position were already counted by the run that saved it.
            fresh = [e for e in events if (e.epoch, e.at) >= resume]
            events.clear()
            batch = to_batch(images) if keys else None
            label_tensor = torch.tensor(labels, dtype=torch.int64) if keys else None
            return Item(worker, progress.epoch, progress.consumed, done, batch, label_tensor, list(keys), fresh)

        for image, label, key in self.unit_samples(worker, resume, progress, events):
            images.append(image), labels.append(label), keys.append(key)
            if len(keys) == self.config.batch_size:
                yield emit(done=False)
                images, labels, keys = [], [], []
        yield emit(done=True)  # finite only: the partial last batch, the tail's bad samples, "done"

    def unit_samples(self, worker: int, resume: tuple[int, int], progress: Progress,
                     events: list[BadEvent]) -> Iterator[tuple[np.ndarray, int, str]]:
        """Decoded samples of this unit from the resume position on; one epoch, or forever if resampled."""
        c = self.config
        unit, units = c.rank * c.workers + worker, c.world_size * c.workers
        skip = resume[1]
        while True:
            plan = plan_unit(c.shards, seed=c.seed, epoch=progress.epoch, unit=unit, units=units,
                             resampled=c.resampled)
            raw = read_plan(plan, events, progress, c.retries, c.timeout_s)
            if c.shuffle_buffer > 1:
                raw = wds.filters.shuffle(c.shuffle_buffer, initial=c.shuffle_buffer,
                                          rng=seeded_rng(c.seed, progress.epoch, unit, "buffer"))(raw)
            good = 0
            for sample in raw:
                progress.consumed += 1
                if progress.consumed <= skip:
                    continue  # replaying up to the restored position: read, not decoded
                try:
                    image, label = self.decode(sample, progress.epoch)
                except Exception as exn:  # a sample that fails to decode costs that sample only
                    events.append(BadEvent(sample.get("__key__", "?"), f"{type(exn).__name__}: {exn}", 1,
                                           progress.epoch, progress.consumed - 1))
                    continue
                good += 1
                yield image, label, sample["__key__"]
            if not c.resampled:
                return
            if good == 0 and skip == 0:  # else an infinite stream would spin without ever yielding
                raise TooManyBadSamples(f"rank {c.rank} worker {worker}: resampled epoch {progress.epoch} "
                                        f"yielded no good sample; bad: {events[:3]}")
            progress.epoch, progress.consumed, skip = progress.epoch + 1, 0, 0

    def decode(self, sample: dict[str, Any], epoch: int) -> tuple[np.ndarray, int]:
        """Image and label of a sample `read_shard` delivered (it checked the members and the label)."""
        c = self.config
        if "npy" in sample:  # a latent set (pipeline.encode): used as stored, never resized or flipped
            return decode_latent(sample["npy"], c.resolution, c.channels), sample["__label__"]
        image = decode_image(sample["png"], c.resolution, c.channels, c.fit)
        if c.hflip and flip_this(c.seed, epoch, sample["__key__"]):
            image = np.ascontiguousarray(image[:, :, ::-1])
        return image, sample["__label__"]


def _identity(item: Item) -> Item:
    return item


# ---------------------------------------------------------------- the loader
def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else RANK/WORLD_SIZE from the environment, else torch.distributed, else (0, 1)."""
    if rank is None and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    if world_size is None and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


class StreamingLoader:
    """Iterate `Batch`es from a shard folder or pattern; one finite epoch per `iter()` unless resampled.

    Iterating a finite loader yields the rest of the current epoch, then moves to the next epoch; breaking
    out mid-epoch and iterating again continues where it stopped. `state_dict()` / `load_state_dict()`
    save and restore that position exactly. A resampled loader never ends.
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int, resolution: int | Sequence[int], channels: int,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 1000, hflip: bool = False, resampled: bool = False,
                 max_bad_fraction: float = 0.01, fit: str = "resize", retries: int = urls.DEFAULT_RETRIES,
                 timeout_s: float = urls.DEFAULT_TIMEOUT_S, verify: str = "size"):
        resolution = image_size(resolution)
        if batch_size < 1 or min(resolution) < 1 or channels < 1 or num_workers < 0:
            raise LoaderError(f"need batch_size >= 1, resolution >= 1, channels >= 1, num_workers >= 0; got "
                              f"{batch_size}, {resolution}, {channels}, {num_workers}")
        if fit not in FITS or not 0 <= max_bad_fraction <= 1 or verify not in shard_format.VERIFY_LEVELS:
            raise LoaderError(f"fit must be one of {FITS}, max_bad_fraction in [0, 1] and verify one of "
                              f"{shard_format.VERIFY_LEVELS}; got {fit!r}, {max_bad_fraction}, {verify!r}")
        rank, world_size = resolve_rank(rank, world_size)
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        if retries < 0 or timeout_s <= 0:
            raise LoaderError(f"need retries >= 0 and timeout_s > 0; got {retries}, {timeout_s}")
        self.config = StreamConfig(resolve_shards(path, verify, timeout_s), batch_size, resolution, channels, fit,
                                   seed, rank, world_size, max(1, num_workers), shuffle_buffer, hflip, resampled,
                                   retries, timeout_s)
        self.epoch = 0
        self._reset_positions(0)

    # ------------------------------------------------------------ position
    def _reset_positions(self, epoch: int) -> None:
        self.positions = [{"epoch": epoch, "consumed": 0, "done": False} for _ in range(self.config.workers)]
        self.next_worker = 0
        self.good = self.bad = 0  # per epoch (finite) or since the start (resampled)
        self._expected_count = self._expected()

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "positions": [dict(p) for p in self.positions],
                "next_worker": self.next_worker, "good": self.good, "bad": self.bad,
                "layout": self._layout()}

    def _layout(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""
        c = self.config
        return {"seed": c.seed, "rank": c.rank, "world_size": c.world_size, "workers": c.workers,
                "batch_size": c.batch_size, "shuffle_buffer": c.shuffle_buffer, "resampled": c.resampled,
                "num_shards": len(c.shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        self.epoch = int(state["epoch"])
        if state["layout"] != self._layout():
            # Another world size or worker count cannot replay the same batches: restart the saved epoch.
            # A resampled stream moves on to a fresh epoch instead of replaying its first one.
            if self.config.resampled:
                self.epoch = 1 + max(p["epoch"] for p in state["positions"])
            logger.warning("loader layout changed since the checkpoint (%s -> %s): starting epoch %d from its "
                           "start", state["layout"], self._layout(), self.epoch)
            self._reset_positions(self.epoch)
            return
        self.positions = [dict(p) for p in state["positions"]]
        self.next_worker, self.good, self.bad = state["next_worker"], state["good"], state["bad"]
        self._expected_count = self._expected()

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        if all(p["done"] for p in self.positions):
            self.epoch += 1
            self._reset_positions(self.epoch)
        for item in self._items():
            self._absorb(item)
            if item.keys:
                yield Batch(item.images, item.labels, item.keys)
        self._end_epoch()

    def _items(self) -> Iterator[Item]:
        dataset = UnitStream(self.config, self.positions, self.next_worker)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                collate_fn=_identity))

    def _absorb(self, item: Item) -> None:
        for event in item.bad:
            logger.warning("skipped bad sample(s) %s (%d lost) on rank %d: %s", event.key, event.count,
                           self.config.rank, event.reason)
        self.bad += sum(e.count for e in item.bad)
        self.good += len(item.keys)
        self.positions[item.worker] = {"epoch": item.epoch, "consumed": item.consumed, "done": item.done}
        self.next_worker = (item.worker + 1) % self.config.workers
        self._check_bad(self._expected_count, final=False)

    def _end_epoch(self) -> None:
        """A finite epoch is over: judge its bad fraction."""
        self._check_bad(self.good + self.bad, final=True)
        if self.good == 0:
            logger.warning("rank %d got no samples in epoch %d (%d shards for %d ranks x %d workers)",
                           self.config.rank, self.epoch, len(self.config.shards), self.config.world_size,
                           self.config.workers)

    def _expected(self) -> int | None:
        """Samples this rank should see per (finite) epoch, from the manifest counts; None when unknown."""
        c = self.config
        plans = [plan_unit(c.shards, seed=c.seed, epoch=self.epoch, unit=c.rank * c.workers + w,
                           units=c.world_size * c.workers, resampled=False) for w in range(c.workers)]
        counts = [p.expected() for p in plans]
        return None if None in counts else sum(counts)

    def _check_bad(self, denominator: int | None, final: bool) -> None:
        seen = self.good + self.bad
        if not final:
            if denominator is None and not self.config.resampled:
                return  # unknown epoch size: judge at the epoch's end
            denominator = max(seen, denominator or MIN_SAMPLES_FOR_RUNNING_CHECK)
        if self.bad and self.bad > self.max_bad_fraction * denominator:
            raise TooManyBadSamples(
                f"{self.bad} bad sample(s) out of {seen} read on rank {self.config.rank} "
                f"(> max_bad_fraction {self.max_bad_fraction} of {denominator}); see the warnings above for keys")

    @property
    def stats(self) -> dict[str, int]:
        """Good and bad samples this epoch (finite) or since the start (resampled), and the epoch
        (for a resampled stream: the furthest epoch any worker has reached)."""
        epoch = max(p["epoch"] for p in self.positions) if self.config.resampled else self.epoch
        return {"epoch": epoch, "good": self.good, "bad": self.bad}
