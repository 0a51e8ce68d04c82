"""Elastic resume: continue a run checkpointed by N ranks on M != N ranks.

- Model and optimizer state: DeepSpeed's own universal checkpoint. At ZeRO 1-3 the checkpoint is converted once
  (`deepspeed.checkpoint.ds_to_universal`, by rank 0, into `<checkpoint>/universal`, atomically: a temporary
  folder renamed into place; the original files are never touched) and loaded with `load_universal_checkpoint`.
  At ZeRO 0 every rank holds the whole state, so the checkpoint itself is already world-size independent.
- The global batch (micro_batch x ranks x grad_accum) is a property of the run: the micro-batch is re-derived
  for the new world size, and a world size that cannot split the global batch is refused.
- EMA: each rank's fp32 shadow (its partition under ZeRO-3) is re-assembled from every saved rank and cut
  into this rank's new partition.
- Loader: its saved cursor is world-size independent (pipeline/data/loader.py), so the epoch in progress
  continues with every sample seen exactly once.
- Not preserved: the dropout RNG of ranks that did not exist before (they keep their fresh seed).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import pickle
import shutil
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError, checkpoint_meta, rank_state_path, saved_config
from pipeline.config import Config, ConfigError

UNIVERSAL = "universal"  # the converted checkpoint's folder inside the original checkpoint folder


def read_rank_state(ckpt: Path, rank: int) -> dict:
    path = rank_state_path(ckpt, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {path.name}: {exc}") from exc


def saved_layout(ckpt: Path) -> tuple[int, int]:
    """(world size, global batch) the checkpoint was written with."""
    world, train = checkpoint_meta(ckpt)["world_size"], saved_config(ckpt)["train"]
    return world, train["micro_batch"] * world * train["grad_accum"]


def fit_global_batch(config: Config, ckpt: Path, world: int) -> Config:
    """`config` with the micro-batch that keeps the checkpoint's global batch on `world` ranks."""
    saved_world, global_batch = saved_layout(ckpt)
    t = config.train
    if t.micro_batch * world * t.grad_accum == global_batch:
        return config
    if global_batch % (world * t.grad_accum):
        raise ConfigError(f"world size {world} x train.grad_accum {t.grad_accum} does not divide the global batch "
                          f"{global_batch} of {ckpt} (written by {saved_world} rank(s)); use a world size that "
                          f"divides {global_batch} // grad_accum")
    micro = global_batch // (world * t.grad_accum)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"resume: keeping the checkpoint's global batch {global_batch} ({saved_world} -> {world} rank(s)): "
              f"train.micro_batch {t.micro_batch} -> {micro}", flush=True)
    return dataclasses.replace(config, train=dataclasses.replace(t, micro_batch=micro))


def load_resized(engine, ckpt: Path, rank: int, world: int) -> dict:
    """Restore DeepSpeed state written by another number of ranks; return this rank's trainer state."""
    if engine.zero_optimization_stage() == 0:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        universal = ensure_universal(ckpt)
        engine._config.load_universal_checkpoint = True  # read at load time only; the flag is this call's
        try:
            path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt} at world size {world}")
    return merged_rank_state(ckpt, engine.module, rank)


def ensure_universal(ckpt: Path) -> Path:
    """`ckpt`/universal, converting once (rank 0) if absent; every rank raises the same error if it fails."""
    import torch.distributed as dist

    target = ckpt / UNIVERSAL
    error = [None]
    if dist.get_rank() == 0 and not target.is_dir():
        try:
            convert(ckpt, target)
        except Exception as exc:  # DeepSpeed raises assorted types for missing or damaged files
            error[0] = f"checkpoint {ckpt} has no universal conversion and cannot be converted: " \
                       f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])
    return target


def convert(ckpt: Path, target: Path) -> None:
    """ds_to_universal into a temporary folder beside `target`, renamed into place when complete."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged_rank_state(ckpt: Path, module: torch.nn.Module, rank: int) -> dict:
    """This rank's trainer state from all the saved ranks' states: rank 0's step, counters and (world-size
    independent) loader cursor; the EMA re-partitioned; the RNG state of the same rank if it existed."""
    from pipeline.ema import partition

    saved_world, _ = saved_layout(ckpt)
    first = read_rank_state(ckpt, 0)
    partitioned = saved_config(ckpt)["train"]["zero_stage"] == 3
    shadows = [read_rank_state(ckpt, r)["ema"]["shadow"] for r in range(saved_world)] if partitioned \
        else [first["ema"]["shadow"]]
    params = list(module.parameters())
    local = []
    for i, param in enumerate(params):
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        full = torch.cat([s[i].flatten() for s in shadows])[: shape.numel()].view(shape)
        local.append(partition(param, full))
    own = read_rank_state(ckpt, rank) if rank < saved_world else {}
    return {**first, "ema": {"shadow": local, "updates": first["ema"]["updates"]},
            "torch_rng": own.get("torch_rng", torch.get_rng_state()), "cuda_rng": own.get("cuda_rng")}
