"""`python -m pipeline prepare`: ingest real images into WebDataset shards with a manifest.

Sources (each sample keeps `source_index`, its position in the source):
- `digits`: scikit-learn's bundled 1797 real 8x8 digits (the embedded default). Their pixel values are the
  integers 0..16; they become uint8 by `floor(v * 255 / 16 + 0.5)` (0 -> 0, 8 -> 128, 16 -> 255), exactly.
- `fashion-mnist`: Fashion-MNIST IDX files (`.gz` or not) in `--path` (default: where the Debian package
  `dataset-fashion-mnist` puts them); `--split train|test`.
- `folder`: PNG/JPEG files under `--path`; when they sit in sub-folders, the top sub-folder is the class.
- `npz`: a `.npz` (keys `images` or `x`, optional `labels` or `y`) or a `.npy` of images; uint8, laid out
  NHW, NHWC or NCHW.

Re-running into the same folder with the same data and sharding rewrites nothing; a folder holding a
different data set is refused unless `--overwrite`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.cli import count, output_folder
from pipeline.data import destination, shards, urls
from pipeline.errors import PipelineError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAY_MODES = {"1", "L", "LA"}
COLOR_MODES = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SHARD_BYTES = 100_000_000
# Files a shard folder may hold besides the manifest: shards and our own temporary files.
OWN_FILE = re.compile(r"^(shard-\d{6}\.tar|\.shard-\d{6}\.tar\..*\.tmp|\.manifest\.json\..*\.tmp)$")
SOURCES = ("digits", "fashion-mnist", "folder", "npz")


class PrepareError(PipelineError, ValueError):
    """Bad input to `prepare`: the message names what is wrong."""


@dataclass
class Source:
    """An ingest source: its description, shape, classes and a way to iterate its images in order."""

    description: dict[str, Any]
    image_size: tuple[int, int]
    channels: int
    class_names: list[str]
    num_samples: int
    fingerprint: str  # sha256 over the source's content: identifies the data set
    items: Callable[[], Iterator[tuple[np.ndarray, int, dict[str, Any]]]] = field(repr=False)


# ---------------------------------------------------------------- array sources
def array_source(description: dict[str, Any], images: np.ndarray, labels: np.ndarray | None,
                 class_names: list[str]) -> Source:
    """A source over in-memory uint8 images (N,H,W) or (N,H,W,C) and optional int labels (N,)."""
    labels = np.full(len(images), -1, np.int64) if labels is None else labels.astype(np.int64)
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())

    def items():
        for i in range(len(images)):
            yield images[i], int(labels[i]), {}

    channels = 1 if images.ndim == 3 else images.shape[3]
    return Source(description, (images.shape[1], images.shape[2]), channels, class_names, len(images),
                  digest.hexdigest(), items)


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn digits (integers 0..16) to uint8 0..255 by floor(v * 255 / 16 + 0.5)."""
    if values.min() < 0 or values.max() > 16:
        raise PrepareError(f"digits values must lie in 0..16, got {values.min()}..{values.max()}")
    return np.floor(values.astype(np.float64) * 255.0 / 16.0 + 0.5).astype(np.uint8)


def load_digits_source() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    description = {"kind": "digits", "loader": "sklearn.datasets.load_digits",
                   "pixel_mapping": "uint8 = floor(v * 255 / 16 + 0.5), v in 0..16"}
    return array_source(description, digits_to_uint8(digits.images), digits.target,
                        [str(int(c)) for c in digits.target_names])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip or plain, told by its first bytes) holding unsigned bytes, as a uint8 array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exn:
            raise PrepareError(f"{path}: damaged gzip data ({exn})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise PrepareError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise PrepareError(f"{path}: IDX header says {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise PrepareError(f"no {stem}[.gz] in {folder} (install the Debian package dataset-fashion-mnist "
                       "or pass --path to a folder of Fashion-MNIST IDX files)")


def load_fashion_mnist_source(path: str | None, split: str) -> Source:
    folder = Path(path or FASHION_MNIST_DIR)
    if folder.exists() and not folder.is_dir():
        raise PrepareError(f"--path {folder} is a file; --source fashion-mnist needs the folder of its IDX files")
    if not folder.is_dir():
        raise PrepareError(f"Fashion-MNIST folder {folder} does not exist (apt-get install dataset-fashion-mnist, "
                           "or pass --path)")
    prefix = IDX_PREFIX[split]
    images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise PrepareError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    description = {"kind": "fashion-mnist", "path": str(folder.resolve()), "split": split}
    return array_source(description, images, labels, FASHION_MNIST_CLASSES)


def to_nhw_or_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """NHW stays; 4-D arrays are NHWC when the last axis is 1 or 3, else NCHW when axis 1 is 1 or 3."""
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images[..., 0] if images.shape[3] == 1 else images
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return to_nhw_or_nhwc(np.transpose(images, (0, 2, 3, 1)), where)
    raise PrepareError(f"{where}: images of shape {images.shape} are not NHW, NHWC or NCHW with 1 or 3 channels")


def pick_key(arrays: Any, names: tuple[str, ...], where: str, required: bool) -> np.ndarray | None:
    found = [n for n in names if n in arrays.files]
    if not found:
        if required:
            raise PrepareError(f"{where}: no array named {' or '.join(names)} (has: {', '.join(arrays.files)})")
        return None
    return arrays[found[0]]


def load_array_source(path: str | None) -> Source:
    if not path:
        raise PrepareError("--source npz needs --path to a .npz or .npy file")
    file = Path(path)
    if file.is_dir():
        raise PrepareError(f"--path {file} is a folder; --source npz needs a .npz or .npy file")
    if not file.is_file():
        raise PrepareError(f"--path {file} does not exist")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exn:
        raise PrepareError(f"{file}: not a readable .npy/.npz ({exn})") from None
    if isinstance(loaded, np.ndarray):
        images, labels = loaded, None
    else:
        images = pick_key(loaded, ("images", "x"), str(file), required=True)
        labels = pick_key(loaded, ("labels", "y"), str(file), required=False)
    if images.dtype != np.uint8:
        raise PrepareError(f"{file}: images must be uint8 (0..255), got {images.dtype}")
    images = to_nhw_or_nhwc(images, str(file))
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise PrepareError(f"{file}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        if len(labels) and labels.min() < 0:
            raise PrepareError(f"{file}: labels must be >= 0, got {labels.min()}")
    class_names = [] if labels is None or not len(labels) else [str(i) for i in range(int(labels.max()) + 1)]
    return array_source({"kind": "npz", "path": str(file.resolve())}, images, labels, class_names)


# ---------------------------------------------------------------- folder source
def list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def folder_classes(folder: Path, files: list[Path]) -> tuple[list[str], list[int]]:
    """Class = top sub-folder when images sit in sub-folders; none (-1) when all sit at the top."""
    tops = [p.relative_to(folder).parts for p in files]
    nested = [len(parts) > 1 for parts in tops]
    if not any(nested):
        return [], [-1] * len(files)
    if not all(nested):
        loose = files[nested.index(False)]
        raise PrepareError(f"{folder}: images are in class sub-folders, but {loose.name} sits at the top; "
                           "move it into a class folder")
    class_names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [index[parts[0]] for parts in tops]


def read_image_file(file: Path) -> bytes:
    """The bytes of an image file that decodes whole; a PrepareError naming it otherwise, so a damaged file
    stops `prepare` before anything is written."""
    from PIL import Image

    try:
        data = file.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:  # Pillow's ways to fail
        raise PrepareError(f"{file}: not a readable image ({type(exn).__name__}: {exn}); remove or replace "
                           "it") from None
    return data


def load_folder_source(path: str | None) -> Source:
    from PIL import Image

    if not path:
        raise PrepareError("--source folder needs --path to a folder of PNG/JPEG images")
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise PrepareError(f"--path {folder} {what}; --source folder needs a folder of PNG/JPEG images")
    files = list_images(folder)
    if not files:
        raise PrepareError(f"{folder}: no .png/.jpg/.jpeg images found")
    class_names, labels = folder_classes(folder, files)
    sizes, modes, digest = set(), set(), hashlib.sha256()
    for file, label in zip(files, labels):
        data = read_image_file(file)
        digest.update(f"{file.relative_to(folder).as_posix()}:{label}:".encode())
        digest.update(data)
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in GRAY_MODES | COLOR_MODES:
                raise PrepareError(f"{file}: image mode {img.mode} cannot be stored as 8-bit L/RGB losslessly")
            if sizes and (img.height, img.width) not in sizes:
                raise PrepareError(f"{file}: size {img.width}x{img.height} differs from the other images "
                                   f"({next(iter(sizes))[1]}x{next(iter(sizes))[0]}); all must share one size")
            sizes.add((img.height, img.width))
            modes.add(img.mode)
    mode = "L" if modes <= GRAY_MODES else "RGB"

    def items():
        for file, label in zip(files, labels):
            with Image.open(file) as img:
                yield np.asarray(img.convert(mode)), label, {"path": file.relative_to(folder).as_posix()}

    description = {"kind": "folder", "path": str(folder.resolve()), "color": mode}
    return Source(description, next(iter(sizes)), 1 if mode == "L" else 3, class_names, len(files),
                  digest.hexdigest(), items)


def load_source(kind: str, path: str | None = None, split: str | None = None) -> Source:
    if split is not None and kind != "fashion-mnist":
        raise PrepareError(f"--split applies to fashion-mnist only, not to {kind}")
    if kind == "digits":
        if path:
            raise PrepareError("--source digits is bundled with scikit-learn and takes no --path")
        return load_digits_source()
    if kind == "fashion-mnist":
        return load_fashion_mnist_source(path, split or "train")
    if kind == "folder":
        return load_folder_source(path)
    if kind == "npz":
        return load_array_source(path)
    raise PrepareError(f"unknown source {kind!r}; choose from {', '.join(SOURCES)}")


# ---------------------------------------------------------------- writing
def check_out_dir(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest of the same data set (or None); refuse a folder holding something else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder")
    if (out / shards.MANIFEST_NAME).exists():
        try:
            manifest = shards.read_manifest(out)
        except shards.ManifestError as exn:
            if overwrite:
                return None
            raise PrepareError(f"{exn}; pass --overwrite to replace the folder's content") from None
        if manifest.get("source_fingerprint") == fingerprint or overwrite:
            return manifest
        raise PrepareError(f"{out} already holds a different data set ({manifest.get('source')}); "
                           "pass --overwrite to replace it, or choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if not OWN_FILE.match(p.name))
    if foreign and not overwrite:
        raise PrepareError(f"{out} is not empty and is not a shard folder (holds {', '.join(foreign[:3])}...); "
                           "pass --overwrite to write into it anyway, or choose another --out")
    return None


def is_up_to_date(out: Path, manifest: dict[str, Any] | None, fingerprint: str, sharding: dict[str, int]) -> bool:
    return (manifest is not None and manifest.get("source_fingerprint") == fingerprint
            and manifest.get("sharding") == sharding and not shards.verify_shards(out, manifest))


def write_source(source: Source, out: Path, sharding: dict[str, int], progress: bool = True) -> dict[str, Any]:
    """Write all shards, drop stale ones, then the manifest last (a crash leaves no manifest)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / shards.MANIFEST_NAME).unlink(missing_ok=True)  # the old manifest no longer describes the folder
    writer = shards.ShardWriter(out, max_count=sharding["max_count"], max_bytes=sharding["max_bytes"])
    bar = tqdm(total=source.num_samples, desc=f"prepare {source.description['kind']}", unit="img",
               disable=not progress, file=sys.stderr)
    with bar:
        for sample_id, (image, label, meta) in enumerate(source.items()):
            meta = {"source_index": sample_id, **meta}
            writer.add(shards.make_sample(sample_id, shards.encode_png(image), label, meta))
            bar.update(1)
        records = writer.close()
    kept = {r["name"] for r in records}
    for stale in out.iterdir():
        if OWN_FILE.match(stale.name) and stale.name not in kept:
            stale.unlink()
    manifest = shards.make_manifest(source=source.description, image_size=source.image_size,
                                    channels=source.channels, class_names=source.class_names, shards=records,
                                    source_fingerprint=source.fingerprint, sharding=sharding)
    shards.write_manifest(out, manifest)
    return manifest


def prepare(kind: str, out: str | os.PathLike, *, path: str | None = None, split: str | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], bool]:
    """Ingest `kind` into shards under `out`. Returns (manifest, whether anything was written)."""
    if shard_size < 1:
        raise PrepareError(f"--shard-size must be >= 1, got {shard_size}")
    if max_shard_bytes < shards.tar_size(0):
        raise PrepareError(f"--max-shard-bytes must be >= {shards.tar_size(0)}, got {max_shard_bytes}")
    source = load_source(kind, path, split)
    if source.num_samples == 0:
        raise PrepareError(f"source {kind} at {path} holds no images")
    sharding = {"max_count": shard_size, "max_bytes": max_shard_bytes}
    target = destination.remote(out)
    if target is not None:
        return prepare_remote(source, target, sharding, overwrite, progress)
    out = Path(urls.local_path(out))
    existing = check_out_dir(out, source.fingerprint, overwrite)
    if is_up_to_date(out, existing, source.fingerprint, sharding):
        return existing, False
    return write_source(source, out, sharding, progress), True


def prepare_remote(source: Source, target: destination.Destination, sharding: dict[str, int], overwrite: bool,
                   progress: bool) -> tuple[dict[str, Any], bool]:
    """Like a local folder: the same set already there is left alone, another one is refused unless
    --overwrite; else the set is built in a local staging folder and uploaded, its manifest last."""
    existing = target.read_manifest()
    if existing is not None and existing.get("source_fingerprint") != source.fingerprint and not overwrite:
        raise PrepareError(f"{target} already holds a different data set ({existing.get('source')}); "
                           "pass --overwrite to replace it, or choose another --out")
    if (existing is not None and existing.get("source_fingerprint") == source.fingerprint
            and existing.get("sharding") == sharding and target.holds(existing)):
        return existing, False
    with target.staging() as stage:
        manifest = write_source(source, stage, sharding, progress)
    return manifest, True


# ---------------------------------------------------------------- CLI
def out_location(text: str) -> str:
    """--out: a remote location as given; a local one is checked like every output folder (pipeline.cli)."""
    return text if urls.is_remote(text) else str(output_folder(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="digits",
                        help="where the images come from (default: digits, bundled with scikit-learn)")
    parser.add_argument("--path", default=None,
                        help=f"source location: IDX folder for fashion-mnist (default {FASHION_MNIST_DIR}), "
                             "image folder for folder, .npz/.npy file for npz")
    parser.add_argument("--out", type=out_location, required=True,
                        help="output folder for shard-%%06d.tar files and manifest.json: local, http(s)://HOST/DIR "
                             "(HTTP PUT) or 'pipe:COMMAND {name}' (an upload command)")
    parser.add_argument("--shard-size", type=count, default=DEFAULT_SHARD_SIZE,
                        help=f"most samples per shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--max-shard-bytes", type=count, default=DEFAULT_MAX_SHARD_BYTES,
                        help=f"most bytes per shard file (default {DEFAULT_MAX_SHARD_BYTES})")
    parser.add_argument("--split", choices=tuple(IDX_PREFIX), default=None,
                        help="fashion-mnist split (default train); other sources have none")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different data set already in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    # PrepareError/ManifestError are PipelineErrors: the CLI prints them without a traceback (status 2).
    manifest, wrote = prepare(args.source, args.out, path=args.path, split=args.split,
                              shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
                              overwrite=args.overwrite, progress=not args.no_progress)
    h, w = manifest["image_size"]
    what = (f"{manifest['num_samples']} samples ({h}x{w}, {manifest['channels']} channel(s), "
            f"{len(manifest['class_names'])} classes) in {len(manifest['shards'])} shard(s) in {args.out}")
    print(f"wrote {what}" if wrote else f"up to date, nothing rewritten: {what}")
    return 0
