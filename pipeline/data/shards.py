"""The one shard format: WebDataset tar shards plus `manifest.json`, written atomically.

A shard folder holds `shard-%06d.tar` files and a `manifest.json`. Each sample in a tar has the key
`%09d` (its global sample id) and three members: `png` (lossless 8-bit L or RGB), `cls` (integer text,
-1 when unlabeled) and `json` (at least `source_index`); a latent set (`encode`) carries `npy` (the latent)
instead of `png`. Ingest (`prepare`), generation and `encode` all write through this module, so a generated
set can be read by the same loader as a real one.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a reader (or a
re-run after a crash) never sees a half-written shard or manifest. Tar members carry a fixed mtime,
owner and mode, so the same samples always give the same bytes and the same sha256.

Reading is owned here too: `read_manifest` refuses malformed values, `verify_shards` checks a folder against
its manifest, and `read_shard` (the one reader, used by the loader and by evaluation) delivers each valid
sample of a shard once and reports exactly what it could not deliver (`ShardReport`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io import atomic_open, atomic_write_bytes  # noqa: F401 (atomic_write_bytes: part of this API)

FORMAT = "webdataset-png-v1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records
TAR_END = 2 * TAR_BLOCK  # two zero blocks close the archive
ZERO_BLOCK = bytes(TAR_BLOCK)
# Keys every manifest must hold (generation adds its own; unknown keys round-trip untouched).
REQUIRED_MANIFEST_KEYS = ("format", "source", "image_size", "channels", "class_names", "num_samples", "shards")
REQUIRED_SHARD_KEYS = ("name", "num_samples", "bytes", "sha256")
KEY_FORMAT = "%09d"  # a sample's key: its global sample id
REQUIRED_MEMBERS = ("png", "cls")  # what a sample needs to be delivered (`json` is metadata)


class ManifestError(PipelineError, ValueError):
    """A shard folder's manifest is missing, unreadable or incomplete."""


# ---------------------------------------------------------------- atomic files and hashes
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- samples
def encode_png(image: np.ndarray) -> bytes:
    """Lossless 8-bit PNG of a uint8 array shaped HxW (L), HxWx1 (L) or HxWx3 (RGB)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        mode = "L"
    elif image.ndim == 3 and image.shape[2] == 3:
        mode = "RGB"
    else:
        raise ValueError(f"encode_png needs HxW, HxWx1 or HxWx3, got shape {image.shape}")
    buffer = io.BytesIO()
    # compress_level fixed so the bytes (and shard sha256) do not depend on Pillow's default.
    Image.fromarray(np.ascontiguousarray(image), mode=mode).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def make_sample(sample_id: int, png: bytes, cls: int, meta: dict[str, Any]) -> dict[str, Any]:
    """One sample in the shard format: key `%09d`, `png` bytes, `cls` text, `json` metadata."""
    if sample_id < 0:
        raise ValueError(f"sample id must be >= 0, got {sample_id}")
    if "source_index" not in meta:
        raise ValueError("sample metadata must hold 'source_index'")
    return {
        "__key__": KEY_FORMAT % int(sample_id),
        "png": png,
        "cls": str(int(cls)).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK  # header + data padded to blocks


def sample_tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar archive (headers + padded data of its members)."""
    return sum(_member_bytes(len(v)) for k, v in sample.items() if not k.startswith("_"))


def tar_size(payload_bytes: int) -> int:
    """Size of a finished tar whose members take `payload_bytes` (end blocks, padded to records)."""
    return -(-(payload_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


# ---------------------------------------------------------------- shards
def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard atomically from samples made by `make_sample`; return its manifest record.

    Generation uses this directly to write shards with fixed sample-id ranges.
    """
    import webdataset as wds  # here, not at the top: webdataset imports torch (2-45 s), `prepare --help` need not

    path = Path(path)
    count = 0
    with atomic_open(path) as f:
        # Fixed owner/mode/mtime: identical samples give an identical file.
        with wds.TarWriter(f, encoder=False, mtime=0, user="", group="", mode=0o444) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
    return {"name": path.name, "num_samples": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class ShardWriter:
    """Cut a stream of samples into shards capped by sample count AND bytes; each written atomically.

    A shard holds at most `max_count` samples and its file at most `max_bytes` bytes (a single
    sample larger than `max_bytes` still gets a shard of its own). `close()` returns the records.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_count: int = 1000, max_bytes: int = 100_000_000,
                 first_shard: int = 0, pattern: str = SHARD_PATTERN):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_bytes < tar_size(0):
            raise ValueError(f"max_bytes must be >= {tar_size(0)} (one empty tar), got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_count, self.max_bytes, self.pattern = max_count, max_bytes, pattern
        self.next_shard = first_shard
        self.records: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0

    def add(self, sample: dict[str, Any]) -> None:
        size = sample_tar_bytes(sample)
        too_big = tar_size(self._pending_bytes + size) > self.max_bytes
        if self._pending and (len(self._pending) >= self.max_count or too_big):
            self.flush()
        self._pending.append(sample)
        self._pending_bytes += size

    def flush(self) -> None:
        """Write the pending samples as one shard (nothing when none are pending)."""
        if not self._pending:
            return
        path = self.out_dir / (self.pattern % self.next_shard)
        self.records.append(write_shard(path, self._pending))
        self.next_shard += 1
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        return self.records

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# ---------------------------------------------------------------- manifest
def make_manifest(*, source: Any, image_size: tuple[int, int], channels: int, class_names: list[str],
                  shards: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A manifest in the contract's layout; `extra` keys (e.g. generation's) are kept as given."""
    return {
        "format": FORMAT,
        "source": source,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "channels": int(channels),
        "class_names": list(class_names),
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": shards,
        **extra,
    }


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomically write `manifest.json` into `folder` (unknown keys are written as given)."""
    check_manifest(manifest, where=f"manifest for {folder}")
    path = Path(folder) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check `folder/manifest.json`; a clear ManifestError when missing, corrupt or incomplete."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {folder}: not a shard folder "
                            "(write one with `python -m pipeline prepare --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ManifestError(f"{path} is not valid JSON: {exn}") from None
    check_manifest(manifest, where=str(path))
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
    if not isinstance(manifest["shards"], list):
        raise ManifestError(f"{where}: 'shards' must be a list")
    for i, shard in enumerate(manifest["shards"]):
        lacking = [k for k in REQUIRED_SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        if lacking:
            raise ManifestError(f"{where}: shards[{i}] lacks {', '.join(lacking)}")
    problems = _manifest_value_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{where}: {problems[0]}{more}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_value_problems(manifest: dict[str, Any]) -> list[str]:
    """Values a reader cannot trust: each one a short phrase naming the key, the value and what is allowed."""
    problems = []
    if manifest["format"] != FORMAT:
        problems.append(f"format {manifest['format']!r} is not {FORMAT!r}")
    size = manifest["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_count(v) and v > 0 for v in size)):
        problems.append(f"image_size {size!r} is not [height, width] of positive integers")
    latent = "latent_shape" in (manifest.get("generator") or {})  # a latent set (pipeline.encode): any C >= 1
    channels = manifest["channels"]
    if not _is_count(channels) or (channels < 1 if latent else channels not in (1, 3)):
        problems.append(f"channels {channels!r} is not {'a positive integer' if latent else '1 or 3'}")
    names = manifest["class_names"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        problems.append(f"class_names {names!r} is not a list of strings")
    seen = set()
    for i, record in enumerate(manifest["shards"]):
        name = record["name"]
        if not (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
                and "\\" not in name):
            problems.append(f"shards[{i}].name {name!r} is not a plain file name")
        elif name in seen:
            problems.append(f"shards[{i}].name {name!r} is listed twice")
        seen.add(name)
        for key in ("num_samples", "bytes", "first_id"):
            if key in record and not _is_count(record[key]):
                problems.append(f"shards[{i}].{key} {record[key]!r} is not an integer >= 0")
        if not (isinstance(record["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])):
            problems.append(f"shards[{i}].sha256 {record['sha256']!r} is not 64 lowercase hex digits")
    if problems:
        return problems
    total = sum(r["num_samples"] for r in manifest["shards"])
    if manifest["num_samples"] != total:
        problems.append(f"num_samples {manifest['num_samples']!r} is not the sum over its shards ({total})")
    ranges = sorted((start, start + r["num_samples"], r["name"])
                    for start, r in zip(_first_ids(manifest["shards"]), manifest["shards"]) if r["num_samples"])
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:]):
        if start < end:
            problems.append(f"shards {name} and {other} claim the same sample ids (from {start})")
    return problems


def _first_ids(records: list[dict[str, Any]]) -> list[int]:
    """The first sample id of each shard: its `first_id` (generation), else where the previous one ended
    (ingest numbers samples 0, 1, ... through the shards in manifest order)."""
    firsts, next_id = [], 0
    for record in records:
        firsts.append(int(record.get("first_id", next_id)))
        next_id = firsts[-1] + int(record["num_samples"])
    return firsts


@dataclass(frozen=True)
class ShardSpec:
    """One shard as its manifest describes it; all but `path` are None when no manifest lists the shard."""

    path: str
    num_samples: int | None = None
    first_id: int | None = None  # the shard holds the sample ids first_id .. first_id + num_samples - 1
    num_classes: int | None = None  # allowed labels: -1 (unlabeled) and 0 .. num_classes - 1
    bytes: int | None = None
    sha256: str | None = None

    @property
    def ids(self) -> range | None:
        if self.num_samples is None or self.first_id is None:
            return None
        return range(self.first_id, self.first_id + self.num_samples)


def shard_specs(folder: str | os.PathLike, manifest: dict[str, Any] | None = None,
                join: Callable[[str, str], str] = os.path.join) -> list[ShardSpec]:
    """The shards a folder's manifest lists, in manifest order (`join` places a name in a remote folder)."""
    manifest = read_manifest(folder) if manifest is None else manifest
    classes = len(manifest["class_names"])
    return [ShardSpec(join(str(folder), r["name"]), int(r["num_samples"]), first, classes, int(r["bytes"]),
                      r["sha256"]) for first, r in zip(_first_ids(manifest["shards"]), manifest["shards"])]


def shard_paths(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[Path]:
    """Paths of the shards a manifest lists, in manifest order."""
    return [Path(spec.path) for spec in shard_specs(folder, manifest)]


# ---------------------------------------------------------------- checking a folder against its manifest
VERIFY_LEVELS = ("off", "size", "sha256")


def verify_shards(folder: str | os.PathLike, manifest: dict[str, Any] | None = None,
                  level: str = "sha256") -> list[str]:
    """How a shard folder disagrees with its manifest, one short line per problem (empty: they agree).

    level "size": every listed shard exists with its recorded size, and no unlisted `*.tar` lies beside
    them (a stat per file). "sha256": also each shard's sha256 and sample count (one read of every shard).
    "off": nothing.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level {level!r} is not one of {VERIFY_LEVELS}")
    if level == "off":
        return []
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    listed = {r["name"] for r in manifest["shards"]}
    problems = [f"{p.name}: in the folder but not in its manifest" for p in sorted(folder.glob("*.tar"))
                if p.name not in listed]
    checked = (check_shard_file(spec, level) for spec in shard_specs(folder, manifest))
    return [p for p in checked if p] + problems


def check_shard_file(spec: ShardSpec, level: str) -> str | None:
    """Why the file at `spec.path` is not the shard its manifest record describes, or None."""
    path = Path(spec.path)
    if not path.is_file():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if spec.bytes is not None and size != spec.bytes:
        return f"{path.name}: {size} bytes, manifest says {spec.bytes}"
    if level != "sha256" or spec.sha256 is None:
        return None
    with open(path, "rb") as f:
        stream = _HashingReader(f)
        count = _count_keys(stream)
        while stream.read(1 << 20):  # hash what follows the archive too
            pass
    digest = stream.digest.hexdigest()
    if digest != spec.sha256:
        return f"{path.name}: sha256 {digest[:12]}... differs from manifest {spec.sha256[:12]}..."
    if spec.num_samples is not None and count != spec.num_samples:
        return f"{path.name}: {count} samples, manifest says {spec.num_samples}"
    return None


class _HashingReader:
    """A read-only stream that hashes what is read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


def count_samples(path: str | os.PathLike) -> int:
    """Number of distinct sample keys in a tar; -1 when the tar is damaged."""
    with open(path, "rb") as stream:
        return _count_keys(stream)


def _count_keys(stream: BinaryIO) -> int:
    problems: list[str] = []
    try:
        keys = {split_member_name(name)[0] for name, _ in tar_members(stream, problems)}
    except EOFError:
        return -1
    return len(keys) if not problems else -1  # a damaged tar never matches a manifest count


# ---------------------------------------------------------------- reading tar streams
class TarFormatError(ValueError):
    """A tar stream that is corrupt (bad header checksum, unsupported number encoding)."""


def tar_members(stream: BinaryIO, problems: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, in order.

    A stream cut short (even only its end-of-archive blocks) raises EOFError: nothing more can be read, and
    a remote reader retries on it. A corrupt header raises TarFormatError without `problems`; with a list,
    it is appended there instead and reading goes on at the next 512-byte block that is a valid header (its
    checksum matches), so one bad header costs one member, not the rest of the shard. Blocks after the
    end-of-archive zeros are read to the end of the stream, so a zeroed header is resynchronised too.

    Reads ustar/pax/GNU-long-name headers directly: ~5x faster than `tarfile` on small members, and
    unlike `tarfile`'s stream mode (which ends quietly at a cut header) it notices every truncation.
    """
    def report(error: type[Exception], message: str) -> None:
        if problems is None:
            raise error(message)
        problems.append(message)

    offset = 0  # bytes read so far
    gap = None  # where in-sync reading stopped (a zero or a damaged block), while looking for the next header
    damaged = None  # the first damaged (non-zero, not a header) block of the gap
    ended = False  # an end-of-archive (zero) block was read
    next_name = None  # from a pax or GNU long-name header, for the member that follows
    while True:
        block = stream.read(TAR_BLOCK)
        at, offset = offset, offset + len(block)
        if len(block) < TAR_BLOCK:
            if damaged is not None:
                report(TarFormatError, f"corrupt tar header at byte {damaged}, no valid header after it")
            if not ended:  # (a cut after the first end-of-archive block loses nothing)
                raise EOFError(f"tar ends at byte {offset}, "
                               + ("inside a block" if block else "before its end-of-archive blocks"))
            return
        header = None if block == ZERO_BLOCK else _parse_header(block)
        if header is None:  # the end of the archive, damage, or bytes after the end
            gap = at if gap is None else gap
            ended = ended or block == ZERO_BLOCK
            damaged = at if damaged is None and block != ZERO_BLOCK else damaged
            continue
        if gap is not None:  # zero or damaged blocks, then a header: the archive had not ended there
            report(TarFormatError, f"corrupt tar header at byte {gap}: {at - gap} bytes skipped to the next "
                                   "valid header")
            gap, damaged, ended, next_name = None, None, False, None
        kind, size = header
        data = stream.read(size)
        offset += len(data)
        name = next_name or _ustar_name(block)
        if len(data) != size:
            raise EOFError(f"tar ends at byte {offset}, inside member {name} ({len(data)} of {size} bytes)")
        offset += len(stream.read(-size % TAR_BLOCK))
        next_name = None
        if kind == b"L":  # GNU long name
            next_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header: only the path matters here
            try:
                next_name = _pax_records(data).get("path")
            except ValueError:
                report(TarFormatError, f"malformed pax header before byte {offset}")
        elif kind in (b"0", b"\0"):
            yield name, data


def _parse_header(block: bytes) -> tuple[bytes, int] | None:
    """(type flag, data size) of a valid tar header block, or None when its checksum or size is bad."""
    try:
        stored = _tar_number(block[148:156])
        size = _tar_number(block[124:136])
    except TarFormatError:
        return None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned:
        signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)  # old tars sum signed bytes
        if stored != signed:
            return None
    return block[156:157], size


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise TarFormatError("base-256 tar numbers (members over 8 GiB) are not supported")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        if digits.isdigit():  # (int() alone would also take signs, underscores and inner spaces)
            return int(digits, 8)
    except ValueError:  # an 8 or a 9
        pass
    if digits:
        raise TarFormatError(f"bad octal number {field!r} in tar header: corrupt header")
    return 0


def _ustar_name(header: bytes) -> str:
    def text(field: bytes) -> str:
        return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    name = text(header[:100])
    if header[345] and header[257:262] == b"ustar":
        return f"{text(header[345:500])}/{name}"
    return name


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse pax records: "LENGTH key=value\\n" repeated (ValueError when malformed)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"bad pax record length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


# ---------------------------------------------------------------- reading samples (loader and evaluation)
def split_member_name(name: str) -> tuple[str, str]:
    """`DIR/KEY.EXT.S` -> (`DIR/KEY`, `EXT.S`), as webdataset groups members; ext is "" without a dot."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def parse_label(data: bytes, num_classes: int | None) -> int:
    """A `cls` member as an int: -1 (unlabeled) or a class the manifest names; ValueError otherwise."""
    label = int(data.decode("ascii"))
    if label < -1 or (num_classes is not None and label >= num_classes):
        allowed = "-1" if num_classes == 0 else f"-1..{num_classes - 1}" if num_classes else "-1 or more"
        raise ValueError(f"label {label} outside the manifest's classes ({allowed})")
    return label


@dataclass
class ShardReport:
    """What reading one shard found: the samples it delivered, and why the others could not be."""

    spec: ShardSpec
    delivered: set[str] = field(default_factory=set)  # keys
    bad: dict[str, str] = field(default_factory=dict)  # key -> why that sample could not be delivered
    damage: list[str] = field(default_factory=list)  # problems of the tar stream itself
    ignored: list[str] = field(default_factory=list)  # members skipped that are not the shard's samples

    @property
    def lost(self) -> int:
        """Samples of this shard not delivered: exact for a shard its manifest lists; without a manifest a
        lower bound (the damaged samples the tar still shows, at least one when the tar is damaged)."""
        if self.spec.num_samples is not None:
            return self.spec.num_samples - len(self.delivered)
        return max(len(self.bad), 1 if self.damage else 0)

    def summary(self) -> str:
        """One line: what was lost, the first few reasons."""
        parts = []
        if self.lost:
            ids = self.spec.ids
            missing = (sorted(set(map(KEY_FORMAT.__mod__, ids)) - self.delivered) if ids is not None
                       else sorted(self.bad))
            shown = ", ".join(f"{key} ({self.bad[key]})" if key in self.bad else key for key in missing[:3])
            parts.append(f"{self.lost} sample(s) lost: {shown}{', ...' if len(missing) > 3 else ''}")
        for what, notes in (("tar damage", self.damage), ("ignored", self.ignored)):
            if notes:
                parts.append(f"{what}: {'; '.join(notes[:2])}{f' (+{len(notes) - 2} more)' if len(notes) > 2 else ''}")
        return "; ".join(parts)


def read_shard(stream: BinaryIO, spec: ShardSpec, report: ShardReport) -> Iterator[dict[str, Any]]:
    """The one strict reader of the shard format: the shard's complete, valid samples, in tar order, each
    key at most once, as {"__key__", "__url__", "png", "cls", "json", "__label__": int}.

    A sample is delivered when it has a `png` and a `cls` whose label the manifest allows, and its key is one
    of the ids the manifest gives the shard (a copied or renamed shard holds foreign keys: skipped). Bad
    content never raises: `report` records each sample not delivered and each damage to the tar. A stream
    cut short raises EOFError after the samples that were whole before the cut.
    """
    sample: dict[str, Any] | None = None
    try:
        for name, data in tar_members(stream, report.damage):
            key, ext = split_member_name(name)
            if sample is not None and (key != sample["__key__"] or ext in sample):
                yield from _deliver(sample, spec, report)
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": spec.path}
            sample[ext] = data
    except EOFError:  # a cut: the sample read before it may be whole
        if sample is not None:
            yield from _deliver(sample, spec, report)
        raise
    if sample is not None:
        yield from _deliver(sample, spec, report)


def _deliver(sample: dict[str, Any], spec: ShardSpec, report: ShardReport) -> Iterator[dict[str, Any]]:
    key, ids = sample["__key__"], spec.ids
    if ids is not None and not (key.isdigit() and key == KEY_FORMAT % int(key) and int(key) in ids):
        report.ignored.append(f"{key!r} is not a sample id of this shard ({ids.start}..{ids.stop - 1})")
        return
    if key in report.delivered:
        report.ignored.append(f"{key} repeated (first copy kept)")
        return
    # a latent set (pipeline.encode) carries its payload as `npy` instead of `png`
    missing = [m for m in REQUIRED_MEMBERS if m not in sample and not (m == "png" and "npy" in sample)]
    try:
        if missing:
            raise ValueError(f"no {' or '.join(missing)} member")
        sample["__label__"] = parse_label(sample["cls"], spec.num_classes)
    except ValueError as exn:
        report.bad.setdefault(key, str(exn))  # a later complete copy of the key may still be delivered
        return
    report.bad.pop(key, None)
    report.delivered.add(key)
    yield sample
