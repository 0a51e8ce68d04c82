"""Planning a generation: which shards the set has, which this task and rank write, and the folder's state.

Shard s holds the global sample ids [s * K, min((s + 1) * K, N)). Task k of n takes shards k, k + n, ...; rank r
of R within a task takes every R-th shard of the task's list. The folder holds
  generation.json          what this folder is being filled with (model hash, sampler, steps, eta, guidance,
                           seed, classes, precision, number of samples, shard size); written once, by whichever
                           task starts first, and compared by every later task (a different model or settings
                           is refused before anything is written);
  done/shard-%06d.json     one small record per finished shard (name, samples, bytes, sha256, first_id),
                           written atomically right after its shard;
  manifest.json            rebuilt from the done records, so several tasks and ranks writing at once never
                           lose a record (no read-modify-write of one shared file).
A shard counts as done when its record exists and its file has the recorded size (`--verify` also checks the
sha256).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.data import shards
from pipeline.errors import PipelineError
from pipeline.io import atomic_open

SPEC_NAME = "generation.json"
SPEC_FORMAT = "pipeline-generation/1"
DONE_DIR = "done"
DONE_RECORD = re.compile(r"^shard-(\d{6})\.json$")


class GenerateError(PipelineError, ValueError):
    """Bad input to `generate`: the message names what is wrong."""


# ---------------------------------------------------------------- the split of the work
def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def shard_ids(shard: int, num_samples: int, shard_size: int) -> range:
    """The global sample ids shard `shard` holds."""
    return range(shard * shard_size, min((shard + 1) * shard_size, num_samples))


def assigned_shards(total: int, task_index: int, num_tasks: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Task k of n takes shards k, k+n, ...; rank r of R takes every R-th of those, starting at the r-th."""
    return list(range(task_index, total, num_tasks))[rank::world_size]


def check_split(total: int, task_index: int, num_tasks: int, rank: int, world_size: int) -> None:
    if num_tasks < 1:
        raise GenerateError(f"--num-tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise GenerateError(f"--task-index must be in [0, {num_tasks}) for --num-tasks {num_tasks}, got {task_index}")
    if num_tasks > total:
        raise GenerateError(f"--num-tasks {num_tasks} is more than the {total} shard(s) to write: tasks "
                            f"{total}..{num_tasks - 1} would have nothing to do; use --num-tasks <= {total} "
                            "or a smaller --shard-size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise GenerateError(f"RANK={rank} / WORLD_SIZE={world_size} from the environment is not a valid split")


def rank_from_env() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise GenerateError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                            "must be integers") from None


# ---------------------------------------------------------------- the folder's spec
def make_spec(inference, generator: dict, num_samples: int, shard_size: int) -> dict[str, Any]:
    cfg = inference.config
    num_classes = cfg.model.num_classes
    vae = inference.vae  # a latent model writes the images its VAE decodes
    return {
        "format": SPEC_FORMAT,
        "generator": generator,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "source": {"kind": "generated", "checkpoint": str(inference.path), "step": inference.step},
        "image_size": [vae.image_size] * 2 if vae else list(cfg.data.image_size),
        "channels": vae.in_channels if vae else cfg.data.channels,
        "class_names": [str(c) for c in range(num_classes)] if num_classes else [],
    }


# Settings a folder's shards were made with: all must match for a rerun to add to the folder.
SPEC_KEYS_THAT_MUST_MATCH = ("num_samples", "shard_size")


def spec_differences(old: dict, new: dict) -> list[str]:
    before, now = old.get("generator", {}), new["generator"]
    diffs = [f"{k}: folder has {before.get(k)!r}, this run asks for {now.get(k)!r}"
             for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]  # either side's extra keys
    diffs += [f"{k}: folder has {old.get(k)!r}, this run asks for {new[k]!r}"
              for k in SPEC_KEYS_THAT_MUST_MATCH if old.get(k) != new[k]]
    return diffs


# ---------------------------------------------------------------- the output folder
def claim_folder(out: Path, spec: dict) -> None:
    """Make `out` a generation folder for `spec`, or check that it already is one; refuse anything else.

    generation.json is created first (before done/, shards or the manifest) with a hard link from a complete
    temporary file, which fails if the name exists: of several tasks starting at once exactly one writes it,
    and the others compare against it.
    """
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out} exists and is not a folder")
    spec_path = out / SPEC_NAME
    if not spec_path.exists():
        refuse_foreign_content(out)
        out.mkdir(parents=True, exist_ok=True)
        _create_exclusively(spec_path, (json.dumps(spec, indent=1, sort_keys=True) + "\n").encode())
    (out / DONE_DIR).mkdir(exist_ok=True)
    diffs = spec_differences(_read_json(spec_path), spec)
    if diffs:
        raise GenerateError(f"--out {out} holds samples generated with other settings ({'; '.join(diffs)}); "
                            "use the same settings to resume, or choose another --out")


def refuse_foreign_content(out: Path) -> None:
    """Refuse a folder without generation.json that holds anything but our temporary (dot) files."""
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if (out / SPEC_NAME).exists():
        return  # another task claimed the folder while we looked (it writes the spec before anything else)
    if shards.MANIFEST_NAME in names:
        raise GenerateError(f"--out {out} holds a data set that generate did not write (a manifest.json without "
                            f"{SPEC_NAME}); choose another --out")
    if names:
        raise GenerateError(f"--out {out} is not empty and is not a generation folder (holds "
                            f"{', '.join(names[:3])}); choose another --out")


def _create_exclusively(path: Path, data: bytes) -> None:
    """Write `path` complete or not at all, and only if it does not exist."""
    try:
        with atomic_open(path, exclusive=True) as f:
            f.write(data)
    except FileExistsError:
        pass  # another task created it first: the caller compares against theirs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise GenerateError(f"cannot read {path}: {exn}") from None


def done_path(out: Path, shard: int) -> Path:
    return out / DONE_DIR / f"shard-{shard:06d}.json"


class DoneRecords:
    """The done records of a folder, read once each (records never change once written)."""

    def __init__(self, out: Path):
        self.out, self.records = out, {}

    def refresh(self) -> dict[int, dict]:
        names = {int(m.group(1)): n for n in os.listdir(self.out / DONE_DIR) if (m := DONE_RECORD.match(n))}
        for shard, name in names.items():
            if shard not in self.records:
                self.records[shard] = _read_json(self.out / DONE_DIR / name)
        return self.records

    def is_done(self, shard: int, verify: bool) -> bool:
        record = self.records.get(shard)
        path = self.out / (shards.SHARD_PATTERN % shard)
        if record is None or not path.is_file() or path.stat().st_size != record["bytes"]:
            return False
        return not verify or shards.sha256_file(path) == record["sha256"]

    def forget(self, shard: int) -> None:
        """Drop a record whose shard is to be regenerated (readers must not trust it meanwhile)."""
        self.records.pop(shard, None)
        done_path(self.out, shard).unlink(missing_ok=True)


def rebuild_manifest(out: Path, spec: dict, done: DoneRecords) -> dict:
    """Write manifest.json from the done records; repeat until no record appeared while writing it.

    Each writer lists the records again after its write and stops only when nothing new appeared, so the
    last manifest written (by whichever of several concurrent writers) holds every record.
    """
    while True:
        listed = sorted(done.refresh())
        manifest = make_manifest(spec, [done.records[s] for s in listed])
        shards.write_manifest(out, manifest)
        if sorted(done.refresh()) == listed:
            return manifest


def make_manifest(spec: dict, records: list[dict]) -> dict:
    planned = num_shards(spec["num_samples"], spec["shard_size"])
    return shards.make_manifest(
        source=spec["source"], image_size=spec["image_size"], channels=spec["channels"],
        class_names=spec["class_names"], shards=records, generator=spec["generator"],
        num_samples_planned=spec["num_samples"], shard_size=spec["shard_size"], num_shards_planned=planned,
        complete=len(records) == planned)


