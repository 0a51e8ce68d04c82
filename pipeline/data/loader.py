"""Streaming loader over the shard format: one seeded global order, dealt out to ranks and workers; exact resume.

The global stream. Epoch e reads the shards in an order permuted by (seed, e) (resampled: drawn with
replacement), through one shuffle buffer seeded by (seed, e); samples without a png drop out. That sequence is
the same for every world size, worker count and batch split. It is dealt out in global batches of
micro_batch x world_size x grad_accum positions: micro-batch slot s = accum * world_size + rank takes positions
[s * micro_batch, (s+1) * micro_batch) of each global batch (the slice the trainer numbers sample ids and draws
noise for), and a rank's micro-batches go round-robin to its DataLoader workers. Every worker reads the whole
stream (tar bytes, cheap) and decodes only what it owns (the expensive part), so the global batches, and the
model trained on them, do not depend on how many ranks or workers share the work. The cost: each worker reads
every shard's bytes; that is cheap from a local or shared file system and grows with the workers over a network,
unless `cache_dir` names a node-local folder (`pipeline.data.cache`): then each node downloads a shard once.
A finite loader yields one epoch per `iter()` (its last global batch partial); an endless one (the trainer's,
and every resampled one) runs epoch into epoch, so a global batch may span two and no sample is ever dropped.

Resume. The position is a cursor: an epoch, an offset into its stream, and how many micro-batches this rank
has taken since. At a global batch boundary the micro-batches fold into the offset, which then names a point
of the global stream alone: restoring it under another world size, worker count or micro-batch split of the
same global batch continues the same stream, every sample of the epoch in progress seen exactly once. Restoring
rebuilds the stream from the epoch's start and reads (without decoding) up to the offset.

Bad data. At the start the shard folder is checked against its manifest (`verify`: "size" stats every
shard and looks for unlisted ones, "sha256" also hashes every shard, "off" skips it): a mismatch is a
LoaderError. While reading, `shards.read_shard` (the one strict reader) delivers only complete samples
whose key is one of the shard's ids and whose label the manifest allows, each at most once, and
resynchronises after a damaged tar header; the samples of a shard it could not deliver are counted
exactly (manifest count - delivered) and logged with their keys, as are samples whose PNG does not decode (the next sample its worker owns takes
the place of one of those); read problems are reported once, by the owner of where they happened.
More bad than `max_bad_fraction` of the samples raises TooManyBadSamples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
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
from pipeline.data.cache import ShardCache, node_folder
from pipeline.data.shardset import LoaderError, ShardInfo, resolve_shards  # noqa: F401 (LoaderError: this API)
from pipeline.errors import PipelineError
from pipeline.images import to_model_range

logger = logging.getLogger(__name__)
FITS = ("resize", "pad")
STATE_VERSION = 2
MIN_SAMPLES_FOR_RUNNING_CHECK = 1000  # when the expected count is unknown, wait this long before judging


class TooManyBadSamples(PipelineError, RuntimeError):
    """More than `max_bad_fraction` of the samples were corrupt, undecodable or lost to truncated shards."""


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, C, H, W): images in [-1, 1], or latents as stored
    labels: torch.Tensor  # int64 (B,), -1 for unlabeled samples
    keys: list[str]  # the samples' keys (global sample ids, `%09d`)


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


# ---------------------------------------------------------------- the global order and how it is dealt out
def epoch_shards(shards: list[ShardInfo], *, seed: int, epoch: int, resampled: bool) -> list[ShardInfo]:
    """The shards of `epoch` in reading order, the same on every rank and worker: a seeded permutation, or
    (resampled) as many seeded draws with replacement."""
    if resampled:
        rng = seeded_rng(seed, epoch, "resample")
        return [shards[rng.randrange(len(shards))] for _ in shards]
    order = list(range(len(shards)))
    seeded_rng(seed, epoch, "shard-order").shuffle(order)
    return [shards[i] for i in order]


@dataclass(frozen=True)
class Split:
    """How the global stream is dealt out: global batches of micro_batch x world_size x grad_accum positions;
    in each, micro-batch slot s = accum * world_size + rank covers positions [s * micro_batch, (s+1) * micro_batch)
    (the slice the trainer gives sample ids and noise); a rank's micro-batches go round-robin to its workers."""

    micro_batch: int
    world_size: int
    grad_accum: int
    workers: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    def owner(self, position: int) -> tuple[int, int]:
        """(rank, that rank's micro-batch index) of a position counted from a global batch's start."""
        batch, slot = divmod(position, self.global_batch)
        accum, rank = divmod(slot // self.micro_batch, self.world_size)
        return rank, batch * self.grad_accum + accum

    def share(self, rank: int, count: int) -> int:
        """How many of positions 0..count-1 belong to `rank`."""
        full, rest = divmod(count, self.global_batch)
        mine = full * self.grad_accum * self.micro_batch
        for accum in range(self.grad_accum):
            lo = (accum * self.world_size + rank) * self.micro_batch
            mine += max(0, min(rest, lo + self.micro_batch) - lo)
        return mine


@dataclass(frozen=True)
class Cursor:
    """Where this rank's next micro-batch starts: `micro` micro-batches past position `offset` of `epoch`'s
    stream (offsets may run past the epoch's end, into the next). With micro == 0 it names a point of the
    global stream alone, independent of the world size, workers and micro-batch size."""

    epoch: int
    offset: int = 0
    micro: int = 0


# ---------------------------------------------------------------- one unit's stream (runs in a worker)
@dataclass
class BadEvent:
    key: str
    reason: str
    count: int  # samples lost (a truncated shard loses several)
    epoch: int
    at: int  # raw samples taken from the epoch's shuffled stream when this happened


@dataclass
class Item:
    """What a worker sends: a micro-batch (maybe empty), its index, and the bad samples met since the last."""

    worker: int
    micro: int  # this rank's micro-batch index, counted from the cursor the stream started at
    done: bool  # finite mode: the epoch has nothing more for this worker
    epoch: tuple[int, int]  # (epoch, its first position counted from the start cursor's epoch) read last
    images: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    bad: list[BadEvent] = field(default_factory=list)


@dataclass
class Progress:
    """Raw samples taken so far from an epoch's shuffled stream."""

    epoch: int
    consumed: int = 0


class ShardRead:
    """One shard through the strict reader (`shards.read_shard`), a remote one re-read from its start when the
    read fails part-way (`urls.read_retrying` skips what was delivered). Iterate it for the samples; then
    `report` says exactly what the shard could not deliver. Loader and evaluation both read this way."""

    def __init__(self, shard: ShardInfo, retries: int = urls.DEFAULT_RETRIES,
                 timeout_s: float = urls.DEFAULT_TIMEOUT_S, cache: ShardCache | None = None):
        self.shard, self.retries, self.timeout_s, self.cache = shard, retries, timeout_s, cache
        self.attempts: list[shard_format.ShardReport] = []  # one report per read of the stream
        self.error: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            cached = self.cache.open(self.shard, self.retries, self.timeout_s) if self.cache else None
            if cached is not None:  # the node's local copy, read like a local shard
                with cached:
                    yield from self._parse(cached)
                return
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


def read_plan(shards: list[ShardInfo], events: list[BadEvent], progress: Progress,
              retries: int = urls.DEFAULT_RETRIES, timeout_s: float = urls.DEFAULT_TIMEOUT_S,
              cache: ShardCache | None = None) -> Iterator[dict[str, Any]]:
    """Samples of the shards, in order, from the strict reader (remote ones through `cache` when given); what a
    shard could not deliver becomes one BadEvent (counting its lost samples exactly), never an exception."""
    for shard in shards:
        read = ShardRead(shard, retries, timeout_s, cache if urls.is_remote(shard.path) else None)
        yield from read
        report = read.report
        if report.lost or report.damage or report.ignored:
            events.append(BadEvent(urls.file_name(shard.path), report.summary(), report.lost, progress.epoch,
                                   progress.consumed))


@dataclass
class StreamConfig:
    shards: list[ShardInfo]
    split: Split
    resolution: tuple[int, int]  # (height, width)
    channels: int
    fit: str
    seed: int
    rank: int
    shuffle_buffer: int
    hflip: bool
    resampled: bool
    endless: bool  # epochs follow each other without a break (a global batch may span two)
    retries: int = urls.DEFAULT_RETRIES  # re-reads of a remote shard that fails part-way
    timeout_s: float = urls.DEFAULT_TIMEOUT_S  # a remote read idle this long counts as dropped
    cache: ShardCache | None = None  # node-local copies of remote shards (pipeline/data/cache.py)


class UnitStream(torch.utils.data.IterableDataset):
    """The per-worker iterable handed to DataLoader: each worker plays one logical worker.

    Every worker reads the whole global stream (tar bytes) and decodes only the positions it owns. `rotation`
    shifts DataLoader worker i to logical worker (i + rotation) % workers, so the round-robin starts at the
    worker that owns the cursor's micro-batch.
    """

    def __init__(self, config: StreamConfig, cursor: Cursor):
        super().__init__()
        self.config, self.cursor = config, cursor

    def __iter__(self) -> Iterator[Item]:
        info = torch.utils.data.get_worker_info()
        c, workers = self.config, self.config.split.workers
        worker = 0 if info is None else (info.id + self.cursor.micro) % workers
        micro = self.cursor.micro + (worker - self.cursor.micro) % workers  # the first micro-batch it owns
        batch, found, epoch = [], [], (self.cursor.epoch, 0)

        def emit(done: bool) -> Item:
            keys = [key for _, _, key in batch]
            images = to_batch([image for image, _, _ in batch]) if batch else None
            labels = torch.tensor([label for _, label, _ in batch], dtype=torch.int64) if batch else None
            item = Item(worker, micro, done, epoch, images, labels, keys, list(found))
            found.clear()
            return item

        for epoch, position, sample, events in self.global_stream():
            owned = position >= 0 and self.owns(position, worker)
            if owned:
                found.extend(events)  # read problems are reported once: by the owner of where they happened
            if sample is None or not owned:
                continue
            try:
                image, label = self.decode(sample, epoch[0])
            except Exception as exn:  # costs this sample only: the next one this worker owns takes its place
                found.append(BadEvent(sample.get("__key__", "?"), f"{type(exn).__name__}: {exn}", 1, epoch[0],
                                      position))
                continue
            batch.append((image, label, sample["__key__"]))
            if len(batch) == c.split.micro_batch:
                yield emit(done=False)
                batch, micro = [], micro + workers
        yield emit(done=True)  # finite only: the partial last batch, the tail's bad samples, "done"

    def owns(self, position: int, worker: int) -> bool:
        rank, micro = self.config.split.owner(position)
        return rank == self.config.rank and micro % self.config.split.workers == worker and micro >= self.cursor.micro

    def global_stream(self) -> Iterator[tuple[tuple[int, int], int, dict | None, list[BadEvent]]]:
        """((epoch, its start), position, sample, new read problems) from the cursor on, the same in every worker of
        every rank. Positions count delivered samples from the cursor's global batch (negative before it). One
        epoch, or forever if endless."""
        c = self.config
        epoch, start = self.cursor.epoch, 0  # start: the epoch's first position, counted from the cursor's epoch
        while True:
            progress, events, index = Progress(epoch), [], 0
            raw = read_plan(epoch_shards(c.shards, seed=c.seed, epoch=epoch, resampled=c.resampled), events, progress,
                            c.retries, c.timeout_s, c.cache)
            if c.shuffle_buffer > 1:
                raw = wds.filters.shuffle(c.shuffle_buffer, initial=c.shuffle_buffer,
                                          rng=seeded_rng(c.seed, epoch, "buffer"))(raw)
            for sample in raw:
                progress.consumed += 1
                index += 1
                yield (epoch, start), start + index - 1 - self.cursor.offset, sample, events[:]
                events.clear()
            if events:
                yield (epoch, start), start + index - self.cursor.offset, None, events[:]
            if not c.endless:
                return
            if index == 0:  # else an endless stream would spin without ever yielding
                raise TooManyBadSamples(f"epoch {epoch} of {len(c.shards)} shard(s) holds no complete sample")
            epoch, start = epoch + 1, start + index

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
    """Iterate `Batch`es from a shard folder or pattern; one finite epoch per `iter()` unless endless.

    Iterating a finite loader yields the rest of the current epoch, then moves to the next epoch; breaking
    out mid-epoch and iterating again continues where it stopped. An endless loader (and a resampled one)
    never ends: epochs follow each other inside the global stream, so no sample is dropped at an epoch's end.
    `state_dict()` / `load_state_dict()` save and restore the position exactly; a position saved at a global
    batch boundary also restores under another world size, worker count or micro-batch split of the same
    global batch (`batch_size` x world_size x `grad_accum`).
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int, resolution: int | Sequence[int], channels: int,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 1000, hflip: bool = False, resampled: bool = False,
                 max_bad_fraction: float = 0.01, fit: str = "resize", retries: int = urls.DEFAULT_RETRIES,
                 timeout_s: float = urls.DEFAULT_TIMEOUT_S, verify: str = "size", grad_accum: int = 1,
                 endless: bool = False, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int | None = None):
        resolution = image_size(resolution)
        if batch_size < 1 or min(resolution) < 1 or channels < 1 or num_workers < 0 or grad_accum < 1:
            raise LoaderError(f"need batch_size >= 1, resolution >= 1, channels >= 1, num_workers >= 0, "
                              f"grad_accum >= 1; got {batch_size}, {resolution}, {channels}, {num_workers}, "
                              f"{grad_accum}")
        if fit not in FITS or not 0 <= max_bad_fraction <= 1 or verify not in shard_format.VERIFY_LEVELS:
            raise LoaderError(f"fit must be one of {FITS}, max_bad_fraction in [0, 1] and verify one of "
                              f"{shard_format.VERIFY_LEVELS}; got {fit!r}, {max_bad_fraction}, {verify!r}")
        rank, world_size = resolve_rank(rank, world_size)
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        if retries < 0 or timeout_s <= 0:
            raise LoaderError(f"need retries >= 0 and timeout_s > 0; got {retries}, {timeout_s}")
        split = Split(batch_size, world_size, grad_accum, max(1, num_workers))
        cache = None if cache_dir is None else ShardCache(node_folder(cache_dir), cache_bytes)
        self.config = StreamConfig(resolve_shards(path, verify, timeout_s), split, resolution, channels, fit, seed, rank,
                                   shuffle_buffer, hflip, resampled, endless or resampled, retries, timeout_s, cache)
        self._start_epoch(0)

    # ------------------------------------------------------------ position
    def _start_epoch(self, epoch: int, offset: int = 0) -> None:
        self.cursor = Cursor(epoch, offset)
        self.latest = (epoch, 0)  # the newest (epoch, first position) the workers reported
        self.epoch_done = False
        self.good = self.bad = 0  # per epoch (finite) or since the start (endless)
        self._expected_count = self._expected()

    @property
    def epoch(self) -> int:
        return self.latest[0] if self.config.endless else self.cursor.epoch

    def global_cursor(self) -> Cursor:
        """The cursor with its micro-batches folded into the offset (possible at a global batch boundary), and
        moved into the newest epoch the workers have seen: the world-size independent form."""
        c, split = self.cursor, self.config.split
        if c.micro % split.grad_accum:
            return c
        offset = c.offset + c.micro // split.grad_accum * split.global_batch
        epoch, start = self.latest
        return Cursor(epoch, offset - start) if epoch > c.epoch and start <= offset else Cursor(c.epoch, offset)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "cursor": dataclasses.asdict(self.global_cursor()),
                "epoch_done": self.epoch_done, "good": self.good, "bad": self.bad, "layout": self._layout()}

    def _layout(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches: `order` fixes the global stream,
        `split` how this rank takes its share of it."""
        c = self.config
        return {"order": {"seed": c.seed, "global_batch": c.split.global_batch, "shuffle_buffer": c.shuffle_buffer,
                          "resampled": c.resampled, "endless": c.endless, "num_shards": len(c.shards)},
                "split": {"rank": c.rank, **dataclasses.asdict(c.split)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") == 1:  # written before the global order: its epoch restarts
            logger.warning("loader state of version 1: starting epoch %d from its start", state["epoch"])
            self._start_epoch(state["epoch"])
            return
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        cursor = Cursor(**state["cursor"])
        same_split = state["layout"]["split"] == self._layout()["split"]
        if state["layout"]["order"] != self._layout()["order"] or (cursor.micro and not same_split):
            # Another global order (or a position inside a global batch under another split) cannot continue
            # the same stream: restart the saved epoch; a resampled stream moves on to a fresh epoch instead.
            epoch = cursor.epoch + 1 if self.config.resampled else cursor.epoch
            logger.warning("loader layout changed since the checkpoint (%s -> %s): starting epoch %d from its "
                           "start", state["layout"], self._layout(), epoch)
            self._start_epoch(epoch)
            return
        self._start_epoch(cursor.epoch, cursor.offset)
        self.cursor, self.epoch_done = cursor, state["epoch_done"]
        if same_split:  # the counts are this rank's own
            self.good, self.bad = state["good"], state["bad"]

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_done:
            self._start_epoch(self.cursor.epoch + 1)
        workers_done = set()
        for item in self._items():
            self._absorb(item)
            workers_done |= {item.worker} if item.done else set()
            if item.keys:
                yield Batch(item.images, item.labels, item.keys)
        self.epoch_done = len(workers_done) == self.config.split.workers
        if self.epoch_done:
            self._end_epoch()

    def _items(self) -> Iterator[Item]:
        dataset = UnitStream(self.config, self.cursor)
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
        if item.keys:
            self.cursor = dataclasses.replace(self.cursor, micro=item.micro + 1)
        self.latest = max(self.latest, item.epoch)
        self._check_bad(self._expected_count, final=False)

    def _end_epoch(self) -> None:
        """A finite epoch is over: judge its bad fraction."""
        self._check_bad(self.good + self.bad, final=True)
        if self.good == 0:
            logger.warning("rank %d got no samples in epoch %d (%d shards for %d ranks x %d workers)",
                           self.config.rank, self.epoch, len(self.config.shards), self.config.split.world_size,
                           self.config.split.workers)

    def _expected(self) -> int | None:
        """Samples this rank should see per epoch, from the manifest counts; None when unknown."""
        counts = [s.num_samples for s in self.config.shards]
        return None if None in counts else self.config.split.share(self.config.rank, sum(counts))

    def _check_bad(self, denominator: int | None, final: bool) -> None:
        seen = self.good + self.bad
        if not final:
            if denominator is None and not self.config.endless:
                return  # unknown epoch size: judge at the epoch's end
            denominator = max(seen, denominator or MIN_SAMPLES_FOR_RUNNING_CHECK)
        if self.bad and self.bad > self.max_bad_fraction * denominator:
            raise TooManyBadSamples(
                f"{self.bad} bad sample(s) out of {seen} read on rank {self.config.rank} "
                f"(> max_bad_fraction {self.max_bad_fraction} of {denominator}); see the warnings above for keys")

    @property
    def stats(self) -> dict[str, int]:
        """Good and bad samples this epoch (finite) or since the start (endless), and the epoch
        (for an endless stream: the newest epoch the workers have reached)."""
        return {"epoch": self.epoch, "good": self.good, "bad": self.bad}
