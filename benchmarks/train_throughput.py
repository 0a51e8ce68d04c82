"""Training throughput (images/s) of the real trainer step, for each loss backend.

Times `Trainer.train_step` (forward, fused or reference loss, backward, DeepSpeed step, EMA) on batches already
on the device, so the number is the model step, not the loader (see loader_throughput.py for that).

  python benchmarks/train_throughput.py                                   # tiny config, CPU, torch loss
  python benchmarks/train_throughput.py --config configs/cifar_ddpm.yaml --backends torch triton   # GPU
Prints a table and appends rows to benchmarks/results/train_throughput.csv (device named in each row).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_steps(trainer, batch, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        trainer.train_step([batch] * trainer.config.train.grad_accum)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([batch] * trainer.config.train.grad_accum)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="run config to benchmark")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "triton"],
                   help="loss backends to compare (triton needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per backend")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--csv", default=str(REPO / "benchmarks/results/train_throughput.csv"), help="CSV to append to")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch=256")
    args = p.parse_args()

    from pipeline.config import load_config
    from pipeline.train import Trainer

    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", "digits", "--out", str(tmp / "d")],
                   check=True, cwd=REPO, capture_output=True)  # the trainer's loader needs a shard set to open
    config = load_config(args.config, [f"data.shards={tmp / 'd'}", "train.sample_every=0", *args.overrides])
    trainer = Trainer(config, tmp / "run")
    d, t = config.data, config.train
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    gen = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(images=torch.rand(t.micro_batch, d.channels, d.resolution, d.resolution,
                                              generator=gen).mul(2).sub(1).to(trainer.device),
                            labels=torch.randint(0, config.model.num_classes or 1, (t.micro_batch,), generator=gen))
    rows = []
    for backend in args.backends:
        config.train.loss_backend = backend
        seconds = time_steps(trainer, batch, args.steps, args.warmup)
        images = args.steps * t.micro_batch * t.grad_accum * trainer.world
        rows.append({"device": device_name(), "config": config.name, "params_M": round(n_params / 1e6, 2),
                     "precision": t.precision, "micro_batch": t.micro_batch, "loss_backend": backend,
                     "steps": args.steps, "ms_per_step": round(1000 * seconds / args.steps, 2),
                     "images_per_s": round(images / seconds, 1)})
    print(f"\n{'device':<28} {'config':<12} {'params':>7} {'prec':>5} {'batch':>6} {'loss':>7} {'ms/step':>9} {'img/s':>9}")
    for r in rows:
        print(f"{r['device'][:28]:<28} {r['config']:<12} {r['params_M']:>6}M {r['precision']:>5} {r['micro_batch']:>6} "
              f"{r['loss_backend']:>7} {r['ms_per_step']:>9} {r['images_per_s']:>9}")
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
