"""Shared steps of the generation tests: run the command in-process, read a shard folder back."""
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.cli import main

FAST = ["--steps", "4", "--no-progress", "--device", "cpu"]  # tests that need CUDA say --device cuda


def generate(checkpoint: Path, out: Path, num: int, *extra: str) -> int:
    """`python -m pipeline generate ...` in this process (the CLI's own error handling included)."""
    return main(["generate", "--checkpoint", str(checkpoint), "--out", str(out), "--num-samples", str(num),
                 *FAST, *extra])


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: to show that nothing was touched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def read_samples(folder: Path) -> list[dict]:
    """All samples of the shards the manifest lists, decoded: id, image (H, W[, C]) uint8, cls, meta."""
    urls = [str(folder / r["name"]) for r in manifest(folder)["shards"]]
    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda u: u, empty_check=False):
        out.append({"id": int(s["__key__"]), "image": np.asarray(Image.open(io.BytesIO(s["png"]))),
                    "cls": int(s["cls"].decode()), "meta": json.loads(s["json"])})
    return out
