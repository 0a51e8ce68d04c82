"""`python -m pipeline generate`: a synthetic data set as WebDataset shards, sharded and resumable.

The output folder uses the one shard format (`pipeline.data.shards`), so a generated set can be trained on,
evaluated or inspected like a real one. The parts live in `pipeline.generation`: `settings` (the flags),
`plan` (the split of the work, the folder's spec, done records, the manifest), `sampling` (the model, fast)
and `writing` (shards and their records).

Determinism: sample i depends only on (model, settings, seed, i), never on the split between tasks, ranks or
batches, so a shard's bytes are the same however the set was generated. Resume: rerun the same command.
"""
from __future__ import annotations

import argparse
import dataclasses

from pipeline.data import destination
from pipeline.generation import settings as settings_module
from pipeline.generation.plan import (SPEC_NAME, DoneRecords, assigned_shards, check_split, claim_folder,
                                      make_manifest, make_spec, num_shards, rank_from_env, rebuild_manifest)
from pipeline.generation.settings import GenerateSettings


@dataclasses.dataclass
class Summary:
    assigned: int
    written: int
    skipped: int
    manifest: dict


def generate(settings: GenerateSettings) -> Summary:
    """Generate this task's (and rank's) shards of the set into `settings.out`."""
    import torch

    from pipeline.generation.sampling import default_device, fast_inference, load_model, resolve_precision
    from pipeline.generation.writing import shard_samples, write_shards

    target = destination.remote(settings.out, "--out")  # a form it cannot write is refused here, in one line
    out = destination.state_folder(settings.out, settings.state) if target else destination.local_folder(settings.out)
    rank, world_size = rank_from_env()
    total = num_shards(settings.num_samples, settings.shard_size)
    check_split(total, settings.task_index, settings.num_tasks, rank, world_size)
    device = torch.device(settings.device or default_device())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # graph capture and side streams use the current device
    inference = load_model(settings.checkpoint, str(device))
    precision = resolve_precision(settings.precision, device)
    sampling = settings.sampling_for(inference.config)
    generator = {"model_hash": inference.model_hash, **sampling.record(), "precision": precision,
                 **({"fused_norm": True} if settings.fused_norm else {})}  # absent when off: older specs still match
    spec = make_spec(inference, generator, settings.num_samples, settings.shard_size)
    claim_folder(out, spec)
    cuda_graph = device.type == "cuda" if settings.cuda_graph is None else settings.cuda_graph
    inference = fast_inference(inference, precision=precision, compile_model=settings.compile_model,
                               cuda_graph=cuda_graph, fused_norm=settings.fused_norm)
    done = DoneRecords(out)
    done.refresh()
    mine = assigned_shards(total, settings.task_index, settings.num_tasks, rank, world_size)
    todo = [s for s in mine if not done.is_done(s, settings.verify)]
    publisher = destination.Publisher(target, out) if target else None
    if publisher:
        publisher.file(SPEC_NAME)
    write_shards(lambda ids: shard_samples(inference, sampling, ids, settings.batch_size), spec, out, done, todo,
                 settings.progress, publish=publisher.shard if publisher else None)
    manifest = rebuild_manifest(out, spec, done)
    if publisher:  # shards finished by an earlier run, then the destination's manifest (uploaded shards only)
        for shard in mine:
            publisher.shard(done.records[shard])
        manifest = publisher.manifest(lambda records: make_manifest(spec, records))
    return Summary(assigned=len(mine), written=len(todo), skipped=len(mine) - len(todo), manifest=manifest)


def add_arguments(p: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(p, GenerateSettings)


def run(args: argparse.Namespace) -> int:
    settings = GenerateSettings.from_args(args)
    summary = generate(settings)
    m = summary.manifest
    print(f"task {settings.task_index}/{settings.num_tasks}: wrote {summary.written} shard(s), {summary.skipped} "
          f"already done; {settings.out} now holds {len(m['shards'])}/{m['num_shards_planned']} shards "
          f"({m['num_samples']} of {m['num_samples_planned']} samples){'' if m['complete'] else ', incomplete'}")
    return 0
