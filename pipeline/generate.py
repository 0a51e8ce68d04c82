"""`python -m pipeline generate`: a synthetic data set as WebDataset shards, sharded and resumable.

The output folder uses the one shard format (`pipeline.data.shards`), so a generated set can be trained on,
evaluated or inspected like a real one. Next to the shards it holds:
  generation.json          what this folder is being filled with (model hash, sampler, steps, eta, guidance,
                           seed, classes, precision, number of samples, shard size); written once, by whichever
                           task starts first, and compared by every later task (a different model or settings
                           is refused before anything is written);
  done/shard-%06d.json     one small record per finished shard (name, samples, bytes, sha256, first_id),
                           written atomically right after its shard;
  manifest.json            rebuilt from the done records, so several tasks and ranks writing at once never
                           lose a record (no read-modify-write of one shared file).

Determinism. Shard s holds the global sample ids [s * K, min((s + 1) * K, N)). Sample i's initial noise and
every step's noise are counter-based on (seed, stream, i) (docs/ARCHITECTURE.md), and batches never straddle
shards, so a shard's bytes do not depend on how the shards were split between tasks or ranks.
Task k of n takes shards k, k + n, ...; rank r of R within a task takes every R-th shard of the task's list.

Resume. A shard counts as done when its record exists and its file has the recorded size (`--verify` also
checks the sha256). A rerun skips done shards and regenerates the rest, overwriting any half-written file, so
a killed run loses nothing and duplicates nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.data import destination, shards
from pipeline.errors import PipelineError
from pipeline.io import atomic_open

SPEC_NAME = "generation.json"
SPEC_FORMAT = "pipeline-generation/1"
DONE_DIR = "done"
DONE_RECORD = re.compile(r"^shard-(\d{6})\.json$")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 256
MANIFEST_INTERVAL_S = 30.0  # rebuild the manifest at most this often while running (always at the end)
PRECISIONS = ("auto", "fp32", "bf16")


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


# ---------------------------------------------------------------- what is generated
def load_model(checkpoint: str, device: str):
    """load_for_inference, with its errors turned into user errors that name the checkpoint."""
    from pipeline.checkpoint import CheckpointError, load_for_inference

    try:
        inference = load_for_inference(checkpoint, device=device)
    except CheckpointError as exn:
        raise GenerateError(f"cannot load --checkpoint {checkpoint}: {exn}") from None
    if inference.config.model.type != "ddpm":
        raise GenerateError(f"--checkpoint {checkpoint} is a {inference.config.model.type} model; generate needs a "
                            "diffusion (ddpm) model, whose noise is keyed by sample id")
    return inference


def resolve_generator(inference, *, sampler, steps, eta, guidance, classes, seed, precision) -> dict[str, Any]:
    """The complete, explicit settings that determine the images (config defaults filled in)."""
    cfg = inference.config
    sampler = sampler or cfg.diffusion.sampler
    steps = steps or cfg.diffusion.sample_steps
    if not 1 <= steps <= cfg.diffusion.timesteps:
        raise GenerateError(f"--steps must be in [1, {cfg.diffusion.timesteps}] (the model's timesteps), got {steps}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise GenerateError(f"--eta {eta}: eta is the DDIM noise level (>= 0) and applies to --sampler ddim only")
    num_classes = cfg.model.num_classes
    if num_classes is None:
        if classes or (guidance is not None and guidance != 1.0):
            raise GenerateError(f"--checkpoint {inference.path} is an unconditional model: --classes and --guidance "
                                "need a class-conditional model (model.num_classes)")
        classes, guidance = None, 1.0
    else:
        classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise GenerateError(f"--classes {bad} out of range: the model has classes 0..{num_classes - 1}")
        guidance = float(cfg.diffusion.guidance if guidance is None else guidance)
    return {"model_hash": inference.model_hash, "sampler": sampler, "steps": int(steps), "eta": float(eta),
            "guidance": guidance, "seed": int(seed), "classes": classes, "precision": precision}


def make_spec(inference, generator: dict, num_samples: int, shard_size: int) -> dict[str, Any]:
    cfg = inference.config
    num_classes = cfg.model.num_classes
    return {
        "format": SPEC_FORMAT,
        "generator": generator,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "source": {"kind": "generated", "checkpoint": str(inference.path), "step": inference.step},
        "image_size": [cfg.data.resolution, cfg.data.resolution],
        "channels": cfg.data.channels,
        "class_names": [str(c) for c in range(num_classes)] if num_classes else [],
    }


# Settings a folder's shards were made with: all must match for a rerun to add to the folder.
SPEC_KEYS_THAT_MUST_MATCH = ("num_samples", "shard_size")


def spec_differences(old: dict, new: dict) -> list[str]:
    diffs = [f"{k}: folder has {old['generator'].get(k)!r}, this run asks for {v!r}"
             for k, v in new["generator"].items() if old.get("generator", {}).get(k) != v]
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


# ---------------------------------------------------------------- sampling fast
class FastDenoiser(torch.nn.Module):
    """The model as generation calls it: bf16 autocast, channels_last and, on CUDA, one captured CUDA graph
    per input shape (the whole UNet forward replays as one launch; inputs are copied into static buffers on
    the device, so a step makes no host-device sync). Returns float32 contiguous outputs."""

    def __init__(self, model: torch.nn.Module, *, bf16: bool = False, channels_last: bool = False,
                 cuda_graph: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.bf16, self.channels_last, self.cuda_graph = bf16, channels_last, cuda_graph
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._pool = None

    def forward(self, x, t, y=None):
        return self._replay(x, t, y) if self.cuda_graph else self._eager(x, t, y)

    def _eager(self, x, t, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x, t, y)
        return out.float().contiguous()

    def _replay(self, x, t, y):
        key = (tuple(x.shape), y is None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, y)
        graph, static = self._graphs[key]
        static["x"].copy_(x)
        static["t"].copy_(t)
        if y is not None:
            static["y"].copy_(y)
        graph.replay()
        return static["out"].clone()  # the next replay overwrites the static output

    def _capture(self, x, t, y):
        static = {"x": x.clone(), "t": t.clone(), "y": None if y is None else y.clone()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuDNN autotuning, lazy initialisation
            for _ in range(2):
                self._eager(static["x"], static["t"], static["y"])
        torch.cuda.current_stream().wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # graphs of all shapes share one pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static["out"] = self._eager(static["x"], static["t"], static["y"])
        return graph, static


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise GenerateError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def fast_inference(inference, *, precision: str, cuda_graph: bool, compile_model: bool):
    """The Inference with its model wrapped for speed (same weights: the export's EMA weights)."""
    device = next(inference.model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise GenerateError(f"--cuda-graph needs a CUDA device, the model is on {device}")
    model = torch.compile(inference.model) if compile_model else inference.model
    wrapped = FastDenoiser(model, bf16=precision == "bf16", channels_last=device.type == "cuda",
                           cuda_graph=cuda_graph)
    return dataclasses.replace(inference, model=wrapped)


def class_labels(ids: range, classes: list[int] | None) -> torch.Tensor | None:
    """Sample i is conditioned on classes[i mod len(classes)] (None for an unconditional model)."""
    if classes is None:
        return None
    return torch.tensor([classes[i % len(classes)] for i in ids], dtype=torch.int64)


def sample_batches(inference, generator: dict, ids: range, batch_size: int) -> Iterator[tuple[range, Any]]:
    """(ids, images on the host) per batch. The next batch's GPU work is queued before the current one is
    handed out, so PNG encoding of one batch overlaps the sampling of the next (no sync in between: the
    copy to the host is asynchronous and waited on by its own event)."""
    from pipeline.sample import sample_images

    pending = None
    for start in range(ids.start, ids.stop, batch_size):
        batch = range(start, min(start + batch_size, ids.stop))
        images = sample_images(inference, len(batch), generator["seed"], sampler=generator["sampler"],
                               steps=generator["steps"], eta=generator["eta"], guidance=generator["guidance"],
                               sample_ids=torch.tensor(list(batch), dtype=torch.int64),
                               labels=class_labels(batch, generator["classes"]))
        current = (batch, *_to_host_async(images))
        if pending is not None:
            yield _wait(pending)
        pending = current
    if pending is not None:
        yield _wait(pending)


def _to_host_async(images: torch.Tensor):
    if images.device.type != "cuda":
        return images, None
    host = images.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _wait(item):
    batch, host, event = item
    if event is not None:
        event.synchronize()
    return batch, host


def shard_samples(inference, generator: dict, ids: range, batch_size: int) -> Iterator[dict]:
    """The shard-format samples of `ids`: png, cls (the class conditioned on, -1 if none), json metadata."""
    from pipeline.images import to_uint8

    meta = {k: generator[k] for k in ("seed", "sampler", "steps", "eta", "guidance", "model_hash")}
    for batch, images in sample_batches(inference, generator, ids, batch_size):
        labels = class_labels(batch, generator["classes"])
        for row, (sample_id, image) in enumerate(zip(batch, to_uint8(images))):
            cls = -1 if labels is None else int(labels[row])
            yield shards.make_sample(sample_id, shards.encode_png(image), cls,
                                     {"source_index": sample_id, "sample_id": sample_id, **meta})


# ---------------------------------------------------------------- the command
@dataclasses.dataclass
class Summary:
    assigned: int
    written: int
    skipped: int
    manifest: dict


def generate(checkpoint: str, out: str | Path, num_samples: int, *, shard_size: int = DEFAULT_SHARD_SIZE,
             sampler: str | None = None, steps: int | None = None, eta: float = 0.0, guidance: float | None = None,
             classes: list[int] | None = None, seed: int = 0, task_index: int = 0, num_tasks: int = 1,
             batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None, precision: str = "auto",
             cuda_graph: bool | None = None, compile_model: bool = False, verify: bool = False,
             progress: bool = True) -> Summary:
    """Generate this task's (and rank's) shards of the set into `out`; see the module docstring."""
    out = destination.local_folder(out)  # a URL is refused here, not made into an oddly named local folder
    rank, world_size = rank_from_env()
    if num_samples < 1 or shard_size < 1 or batch_size < 1:
        raise GenerateError(f"--num-samples, --shard-size and --batch-size must be >= 1, got {num_samples}, "
                            f"{shard_size}, {batch_size}")
    total = num_shards(num_samples, shard_size)
    check_split(total, task_index, num_tasks, rank, world_size)
    device = torch.device(device or default_device())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # graph capture and side streams use the current device
    inference = load_model(checkpoint, str(device))
    precision = resolve_precision(precision, device)
    generator = resolve_generator(inference, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                                  classes=classes, seed=seed, precision=precision)
    spec = make_spec(inference, generator, num_samples, shard_size)
    claim_folder(out, spec)
    inference = fast_inference(inference, precision=precision, compile_model=compile_model,
                               cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph)
    done = DoneRecords(out)
    done.refresh()
    mine = assigned_shards(total, task_index, num_tasks, rank, world_size)
    todo = [s for s in mine if not done.is_done(s, verify)]
    write_todo(inference, generator, spec, out, done, todo, batch_size, progress)
    manifest = rebuild_manifest(out, spec, done)
    return Summary(assigned=len(mine), written=len(todo), skipped=len(mine) - len(todo), manifest=manifest)


def write_todo(inference, generator, spec, out: Path, done: DoneRecords, todo: list[int], batch_size: int,
               progress: bool) -> None:
    from tqdm import tqdm

    count = sum(len(shard_ids(s, spec["num_samples"], spec["shard_size"])) for s in todo)
    last_manifest = time.monotonic()
    with tqdm(total=count, desc="generate", unit="img", disable=not progress, file=sys.stderr) as bar:
        for shard in todo:
            done.forget(shard)
            _remove_partial_files(out, shard)
            ids = shard_ids(shard, spec["num_samples"], spec["shard_size"])
            record = shards.write_shard(out / (shards.SHARD_PATTERN % shard),
                                        _counted(shard_samples(inference, generator, ids, batch_size), bar))
            record.update(first_id=ids.start, status="done")
            shards.atomic_write_bytes(done_path(out, shard), json.dumps(record, sort_keys=True).encode())
            if time.monotonic() - last_manifest > MANIFEST_INTERVAL_S:
                rebuild_manifest(out, spec, done)
                last_manifest = time.monotonic()


def _counted(samples: Iterator[dict], bar) -> Iterator[dict]:
    for sample in samples:
        bar.update(1)
        yield sample


def _remove_partial_files(out: Path, shard: int) -> None:
    """Temporary files a killed writer of this shard left behind (only this shard's: others may be live)."""
    record = done_path(out, shard)
    for tmp in [*out.glob(f".{shards.SHARD_PATTERN % shard}.*.tmp"), *record.parent.glob(f".{record.name}.*.tmp")]:
        tmp.unlink(missing_ok=True)


def default_device() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="an export .safetensors, a run folder (its newest export) or a checkpoint folder")
    p.add_argument("--num-samples", type=int, required=True, help="size of the whole data set (all tasks)")
    p.add_argument("--out", required=True, help="output folder: shard-%%06d.tar, manifest.json, generation.json")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE}); shard s holds ids [s*K, (s+1)*K)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None,
                   help="DDPM ancestral, DDIM, or DPM-Solver++(2M) (default: the config's diffusion.sampler)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's sample_steps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic; ddim only)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (1 = none; class-conditional models only; "
                        "default: the config's diffusion.guidance)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids to condition on, cycled by sample id (default: all classes of a "
                        "class-conditional model)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: sample i depends only on (seed, i)")
    p.add_argument("--task-index", type=int, default=0, help="this task's index k: it writes shards k, k+n, ...")
    p.add_argument("--num-tasks", type=int, default=1, help="number of tasks n splitting the shards")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per forward pass (default {DEFAULT_BATCH_SIZE}); does not change the images")
    p.add_argument("--device", default=None, help="torch device (default: cuda:$LOCAL_RANK if available, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="model arithmetic: bf16 autocast, fp32, or auto (bf16 on a CUDA GPU that has it)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the model forward as a captured CUDA graph (default: on with CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (slower start)")
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of finished shards and regenerate those that differ")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    summary = generate(args.checkpoint, args.out, args.num_samples, shard_size=args.shard_size,
                       sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=args.guidance,
                       classes=args.classes, seed=args.seed, task_index=args.task_index, num_tasks=args.num_tasks,
                       batch_size=args.batch_size, device=args.device, precision=args.precision,
                       cuda_graph=args.cuda_graph, compile_model=args.compile, verify=args.verify,
                       progress=not args.no_progress)
    m = summary.manifest
    print(f"task {args.task_index}/{args.num_tasks}: wrote {summary.written} shard(s), {summary.skipped} already "
          f"done; {args.out} now holds {len(m['shards'])}/{m['num_shards_planned']} shards "
          f"({m['num_samples']} of {m['num_samples_planned']} samples){'' if m['complete'] else ', incomplete'}")
    return 0
