"""Training checkpoints (DeepSpeed, resumable) and EMA exports (safetensors, DeepSpeed-free inference).

Layout inside a run folder:
  checkpoints/step-0000500/            DeepSpeed model/optimizer/scheduler state (every rank's part),
                trainer_state-rank00000.pt   per-rank RunState (versioned): EMA shadow, loader position, RNGs,
                COMPLETE                     written last, by rank 0, after every rank finished writing and
                                             every file was fsynced: format, step, world size, config, the
                                             size of every file (resume checks them, and each .pt's CRCs).
                universal/                   added by the first resume at another world size: DeepSpeed's
                                             world-size independent form of the state (pipeline/elastic.py).
  export/ema-step-0000500.safetensors  EMA weights + resolved config + model hash in the metadata,
         latest.safetensors            a copy of the newest export.
A checkpoint without COMPLETE (a run killed while writing) is never resumed from.

A checkpoint folder is written once, by one save, and never again: a save at a step that already has a folder
writes `step-0000500.r2` (then `.r3`, ...) and the older revision is removed only after the new one is
COMPLETE. So a kill at any instant leaves the old complete checkpoint or the new complete one, never a torn one
under a COMPLETE marker. Removal deletes COMPLETE first, so a half-removed folder is merely incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import Config, build, to_dict
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes, atomic_write_text, fsync_dir

COMPLETE = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"step-\d+(\.r\d+)?")
CHECKPOINT_FORMAT = "pipeline-checkpoint/2"  # in COMPLETE; checkpoints before it have no format key


class CheckpointError(PipelineError, ValueError):
    """A checkpoint or export that is missing, not ours, or does not match its config."""

EXPORT_FORMAT = "pipeline-export/1"


def checkpoint_tag(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[-1].split(".")[0])


def revision_of(path: Path) -> int:
    """1 for `step-0000500`, k for `step-0000500.rk` (a later save of the same step)."""
    return int(path.name.partition(".r")[2] or 1)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Folders named like a save (`step-N`, `step-N.rK`), complete or not; other folders are left alone."""
    root = Path(run_dir) / "checkpoints"
    return [p for p in root.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; of several revisions of one step, only the newest."""
    found = [p for p in checkpoint_folders(run_dir) if (p / COMPLETE).is_file()]
    newest = {}
    for p in sorted(found, key=lambda p: (step_of(p), revision_of(p))):
        newest[step_of(p)] = p
    return list(newest.values())


def new_checkpoint_dir(root: Path, step: int) -> Path:
    """A folder for a new save of `step`: `step-N`, or one revision above every folder of that step."""
    tag = checkpoint_tag(step)
    used = [revision_of(p) for p in [*root.glob(tag), *root.glob(f"{tag}.r*")]]
    return root / (f"{tag}.r{max(used) + 1}" if used else tag)


def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"trainer_state-rank{rank:05d}.pt"


def save_checkpoint(engine, run_dir: Path, step: int, rank_state: dict, keep_last: int, config: dict) -> Path:
    """Collective: every rank writes its part into a new folder; rank 0 seals it (COMPLETE), then prunes."""
    import torch.distributed as dist

    root = Path(run_dir) / "checkpoints"
    chosen = [str(new_checkpoint_dir(root, step)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)  # one name for all ranks, chosen before anyone creates it
    folder = Path(chosen[0])
    engine.save_checkpoint(str(root), tag=folder.name, client_state={"step": step}, save_latest=False)
    atomic_write_bytes(rank_state_path(folder, dist.get_rank()), _torch_bytes(rank_state))
    dist.barrier()
    if dist.get_rank() == 0:
        seal(folder, {"format": CHECKPOINT_FORMAT, "step": step, "world_size": dist.get_world_size(),
                      "config": config})
        prune_checkpoints(root, keep_last)
    dist.barrier()
    return folder


def seal(folder: Path, meta: dict) -> None:
    """Make every file durable, then write COMPLETE listing them with their sizes (what `problem_with` checks)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(folder))] = path.stat().st_size
    fsync_dir(folder)
    atomic_write_text(folder / COMPLETE, json.dumps({**meta, "files": files}))


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and every superseded revision."""
    keep = set(complete_checkpoints(root.parent)[-keep_last:])
    for old in checkpoint_folders(root.parent):
        if (old / COMPLETE).is_file() and old not in keep:
            remove_checkpoint(old)


def remove_checkpoint(folder: Path) -> None:
    (folder / COMPLETE).unlink(missing_ok=True)  # first: a kill mid-removal leaves an incomplete folder
    shutil.rmtree(folder, ignore_errors=True)


def remove_incomplete_checkpoints(run_dir: Path) -> None:
    """Folders of saves that were killed (no COMPLETE): never resumed from, so only taking space."""
    for folder in checkpoint_folders(run_dir):
        if not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- resume

def checkpoint_meta(ckpt: Path) -> dict:
    """COMPLETE's content; a CheckpointError when `ckpt` is not a complete checkpoint of this pipeline."""
    marker = Path(ckpt) / COMPLETE
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"checkpoint {ckpt}: " + ("is a file, not a checkpoint folder" if Path(ckpt).exists()
                                                        else "does not exist"))
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no {COMPLETE} marker (not a checkpoint of this pipeline, or "
                              "its save was interrupted)")
    try:
        meta = json.loads(marker.read_text())
        int(meta["step"]), int(meta["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {COMPLETE} is not this pipeline's marker ({exc})") from exc
    return meta


def problem_with(ckpt: Path) -> str | None:
    """Why `ckpt`, though marked COMPLETE, cannot be resumed from (a file lost, truncated or corrupted after
    the save, e.g. by a full disk or a crash of the file system), or None when every file reads back whole."""
    try:
        listed = checkpoint_meta(ckpt).get("files")  # None in checkpoints written before the list existed
    except CheckpointError as exc:
        return str(exc)
    for name, size in (listed or {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for path in ckpt.rglob("*.pt"):
        try:  # torch.save writes a zip: its directory and every member's CRC check the whole file
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{path.name} is unreadable ({exc})"
        if bad is not None:
            return f"{path.name} is corrupted (member {bad} fails its checksum)"
    return None


def choose_resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `resume` is "auto", "never" or a checkpoint folder. Reads only.

    With auto, the newest complete checkpoint that reads back whole; a damaged one is reported (one line) and
    the previous one tried. A CheckpointError when none is usable, or a given folder is missing or not ours.
    """
    if resume not in ("auto", "never"):
        path = Path(resume)
        checkpoint_meta(path)
        problem = problem_with(path)
        if problem:
            raise CheckpointError(f"--resume {resume}: {problem}")
        return path
    found = complete_checkpoints(run_dir)
    if found and resume == "never":
        raise CheckpointError(f"--resume never: {run_dir} already holds checkpoints; use --resume auto or a new --out")
    for ckpt in reversed(found):
        problem = problem_with(ckpt)
        if problem is None:
            return ckpt
        print(f"skipping damaged checkpoint {ckpt}: {problem}", flush=True)
    if found:
        raise CheckpointError(f"{run_dir}: all {len(found)} complete checkpoints are damaged (see above); "
                              "resume from another with --resume PATH, or start over with a new --out")
    return None


def saved_config(ckpt: Path) -> dict:
    """The resolved config a checkpoint was trained with (its run folder's config.yaml for older ones)."""
    import yaml

    meta = checkpoint_meta(ckpt)
    if "config" in meta:
        return meta["config"]
    config_file = ckpt.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no config recorded (and no {config_file})")
    return yaml.safe_load(config_file.read_text())


def load_checkpoint(engine, ckpt: Path, rank: int, world_size: int) -> dict:
    """Restore DeepSpeed state from `ckpt` and return this rank's run state (see RunState)."""
    info = checkpoint_meta(ckpt)
    if info["world_size"] != world_size:
        from pipeline.elastic import load_resized

        return load_resized(engine, ckpt, rank, world_size)
    try:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:  # DeepSpeed's own errors on a foreign folder
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}: {exc}") from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
    try:
        return torch.load(rank_state_path(ckpt, rank), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {rank_state_path(ckpt, rank).name}: {exc}") from exc


# ---------------------------------------------------------------- the run state each rank saves

class RunState:
    """What a checkpoint saves per rank besides DeepSpeed's own files, as one registry of named parts, each a
    (save, restore) pair: saving and restoring cannot drift apart, and the saved dict carries a version.

    A file of an older version is migrated step by step (MIGRATIONS); one that cannot be is an error that says
    which version wrote it. Everything saved is plain data and tensors, so it loads with weights_only=True.
    """

    def __init__(self, **parts: tuple[Callable[[], Any], Callable[[Any], None]]):
        self.parts = parts

    def state_dict(self) -> dict:
        return {"version": RUN_STATE_VERSION, **{name: save() for name, (save, _) in self.parts.items()}}

    def load_state_dict(self, state: dict, source: Path) -> None:
        state = migrate(state, source)
        missing = sorted(self.parts.keys() - state.keys())
        if missing:
            raise CheckpointError(f"{source}: run state v{RUN_STATE_VERSION} lacks {', '.join(missing)}")
        for name, (_, restore) in self.parts.items():
            restore(state[name])


RUN_STATE_VERSION = 2


def _v1_to_v2(state: dict) -> dict:
    """v1 (no version key) also held the resolved config, which moved into the COMPLETE marker."""
    return {k: v for k, v in state.items() if k != "config"}


MIGRATIONS = {1: _v1_to_v2}  # version k -> k + 1


def migrate(state: dict, source: Path) -> dict:
    version = state.get("version", 1)
    if not isinstance(version, int) or version > RUN_STATE_VERSION:
        raise CheckpointError(f"{source}: run state version {version!r} was written by a newer version of the "
                              f"pipeline (this one reads up to v{RUN_STATE_VERSION}); update the code to resume")
    while version < RUN_STATE_VERSION:
        if version not in MIGRATIONS:
            raise CheckpointError(f"{source}: run state v{version} was written by an older version of the "
                                  "pipeline that this one cannot migrate; start a new run folder")
        state, version = MIGRATIONS[version](state), version + 1
    return state


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- exports (inference without DeepSpeed)

def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of the weights: generation records it and refuses to mix outputs of two models."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def export_weights(state_dict: dict[str, torch.Tensor], config: Config, step: int, run_dir: Path) -> Path:
    from safetensors.torch import save

    export_dir = Path(run_dir) / "export"
    meta = {"format": EXPORT_FORMAT, "config": json.dumps(to_dict(config)), "step": str(step),
            "model_hash": weights_hash(state_dict)}
    data = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=meta)
    path = export_dir / f"ema-{checkpoint_tag(step)}.safetensors"
    atomic_write_bytes(path, data)
    atomic_write_bytes(export_dir / "latest.safetensors", data)
    return path


def prune_exports(run_dir: Path, keep: int | None) -> None:
    """Remove all but the newest `keep` step exports, never one of a complete checkpoint (generating from a
    checkpoint folder loads it) nor latest.safetensors; None keeps every one."""
    if keep is None:
        return
    exports = sorted((Path(run_dir) / "export").glob("ema-step-*.safetensors"), key=step_of)
    protected = {step_of(c) for c in complete_checkpoints(Path(run_dir))}
    for old in exports[:-keep]:
        if step_of(old) not in protected:
            old.unlink(missing_ok=True)


@dataclass
class Inference:
    model: torch.nn.Module
    config: Config
    step: int
    model_hash: str
    path: Path
    vae: torch.nn.Module | None = None  # a latent model's decoder (pipeline/latent.py)


def resolve_export(path: str | Path) -> Path:
    """An export file, an export folder, a run folder or a checkpoint folder -> the export file to load."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / "latest.safetensors", path / "export" / "latest.safetensors"]
    if path.name.startswith("step-"):  # a checkpoint folder: its export sits in the run folder
        candidates.insert(0, path.parent.parent / "export" / f"ema-{checkpoint_tag(step_of(path))}.safetensors")
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"no export found at {path} (looked for: {', '.join(map(str, candidates))}); "
                            "train first, or pass a .safetensors export")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> Inference:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.factory import build_model

    file = resolve_export(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors bytes
        raise CheckpointError(f"{file} is not a safetensors export: {exc}") from exc
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{file} is not an export of this pipeline (metadata format {meta.get('format')!r})")
    from pipeline.config import Config as _Config

    config = build(_Config, json.loads(meta["config"]), prefix="")
    model = build_model(config)
    try:
        model.load_state_dict(load_file(str(file)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the model its config describes: {exc}") from exc
    model.to(device).eval()
    from pipeline.latent import load_decoder

    return Inference(model, config, int(meta["step"]), meta["model_hash"], file, load_decoder(config, device))
