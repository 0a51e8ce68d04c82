"""Training checkpoints (DeepSpeed, resumable) and EMA exports (safetensors, DeepSpeed-free inference).

Layout inside a run folder:
  checkpoints/step-0000500/            DeepSpeed model/optimizer/scheduler state (every rank's part),
                trainer_state-rank00000.pt   per-rank state: EMA shadow, loader position, RNG states,
                COMPLETE                     written last, by rank 0, after every rank finished writing.
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
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, build, to_dict
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes, atomic_write_text

COMPLETE = "COMPLETE"


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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; of several revisions of one step, only the newest."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()] if root.is_dir() else []
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


def save_checkpoint(engine, run_dir: Path, step: int, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank writes its part into a new folder; rank 0 marks it complete, then prunes."""
    import torch.distributed as dist

    root = Path(run_dir) / "checkpoints"
    chosen = [str(new_checkpoint_dir(root, step)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)  # one name for all ranks, chosen before anyone creates it
    folder = Path(chosen[0])
    engine.save_checkpoint(str(root), tag=folder.name, client_state={"step": step}, save_latest=False)
    atomic_write_bytes(rank_state_path(folder, dist.get_rank()), _torch_bytes(rank_state))
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(folder / COMPLETE, json.dumps({"step": step, "world_size": dist.get_world_size()}))
        prune_checkpoints(root, keep_last)
    dist.barrier()
    return folder


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and every superseded revision."""
    keep = set(complete_checkpoints(root.parent)[-keep_last:])
    for old in root.glob("step-*"):
        if (old / COMPLETE).is_file() and old not in keep:
            remove_checkpoint(old)


def remove_checkpoint(folder: Path) -> None:
    (folder / COMPLETE).unlink(missing_ok=True)  # first: a kill mid-removal leaves an incomplete folder
    shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(engine, ckpt: Path, rank: int, world_size: int) -> dict:
    """Restore DeepSpeed state from `ckpt` and return this rank's trainer state."""
    info = json.loads((ckpt / COMPLETE).read_text())
    if info["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {info['world_size']} ranks, this run has {world_size}: "
            "resume with the same number of ranks (or start a new run folder)")
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    return torch.load(rank_state_path(ckpt, rank), map_location="cpu", weights_only=False)


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
