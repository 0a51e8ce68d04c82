"""Training throughput and MFU of the real trainer step, side by side with a minimal plain-PyTorch loop.

`trainer`: `Trainer.train_step` (forward, loss with counter-based noise, backward, DeepSpeed step, clipping,
EMA) on a batch already on the device, so the number is the model step, not the loader. `plain`: the same
model, batch and AdamW in a minimal loop (torch.randn noise, F.mse_loss, backward, step: no DeepSpeed, no
EMA). Interleaved repetitions (trainer, plain, trainer, ...), medians with min-max. Model FLOPs per image are
counted once (pipeline.flops), so each row also gives TFLOP/s and MFU: against the device's bf16 data-sheet
peak (GPUs) and against a matmul measured in this run in the step's dtype.

  python benchmarks/train_throughput.py                                   # tiny config, CPU
  python benchmarks/train_throughput.py --config configs/cifar_ddpm.yaml train.precision=bf16 train.micro_batch=128
  python benchmarks/train_throughput.py --switch train.channels_last=true --switch train.compile=true
With --switch, each switch is timed as its own trainer against the one with every switch off, in the same run.
Prints a table and appends rows to benchmarks/results/train_throughput.csv (device, commit, date per row).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import append_csv, interleaved, load_note, run_stamp, summary  # noqa: E402


def plain_step(config, device, batch):
    """One optimizer step of a minimal PyTorch training loop on the same model and batch."""
    import torch.nn.functional as F

    from pipeline.factory import build_model, build_schedule

    t_cfg = config.train
    torch.manual_seed(t_cfg.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.adam_betas),
                                  weight_decay=t_cfg.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t_cfg.precision == "bf16")
    x0, y = batch.images, batch.labels.to(device) if config.model.num_classes else None
    alpha_bar = build_schedule(config).alphas_cumprod.to(device) if config.model.type == "ddpm" else None

    def step():
        with autocast:
            if alpha_bar is None:
                loss = model.loss(x0)[0]
            else:
                t = torch.randint(0, len(alpha_bar), (len(x0),), device=device)
                noise = torch.randn_like(x0)
                a = alpha_bar[t].view(-1, 1, 1, 1)
                loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="run config to benchmark")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repetition")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (medians are reported)")
    p.add_argument("--csv", default=str(REPO / "benchmarks/results/train_throughput.csv"), help="CSV to append to")
    p.add_argument("--switch", action="append", default=[], metavar="KEY=VALUE",
                   help="a speed switch to time as its own trainer beside the one with all switches off, e.g. "
                        "train.compile=true, or several in one quoted argument; repeat it (a trainer with all of "
                        "them is timed too, unless one --switch already is all of them)")
    p.add_argument("--profile", action="store_true",
                   help="then profile --steps steps of each trainer (torch.profiler) and print where the time goes by "
                        "category (convolutions, norms, attention, optimizer, EMA, ...); rows go to train_profile.csv "
                        "beside --csv")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch=256")
    args = p.parse_args()

    from pipeline.config import load_config
    from pipeline.flops import flops_per_image, matmul_tflops, peak_tflops
    from pipeline.train import Trainer

    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", "digits", "--out", str(tmp / "d")],
                   check=True, cwd=REPO, capture_output=True)  # the trainer's loader needs a shard set to open
    base = [f"data.shards={tmp / 'd'}", "train.sample_every=0", *args.overrides]
    variants = {"trainer": []} | {f"+{s}": s.split() for s in args.switch}
    every = list(dict.fromkeys(o for s in args.switch for o in s.split()))
    if sorted(every) not in [sorted(v) for v in variants.values()]:
        variants["+all"] = every
    trainers = {name: Trainer(load_config(args.config, base + extra), tmp / f"run-{i}")
                for i, (name, extra) in enumerate(variants.items())}
    trainer = trainers["trainer"]
    config = trainer.config
    d, t, device = config.data, config.train, trainer.device
    gen = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(images=torch.rand(t.micro_batch, d.channels, *d.image_size,
                                              generator=gen).mul(2).sub(1).to(device),
                            labels=torch.randint(0, config.model.num_classes or 1, (t.micro_batch,), generator=gen))
    plain = plain_step(config, device, batch)

    def steps_of(trainer):
        def run():
            for _ in range(args.steps):
                trainer.train_step([batch] * t.grad_accum)
        return run

    def plain_steps():
        for _ in range(args.steps * t.grad_accum):
            plain()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    contenders = {name: steps_of(each) for name, each in trainers.items()} | {"plain": plain_steps}
    times = interleaved(contenders, repeats=args.repeats, sync=sync)  # the warm-up call compiles, untimed
    flops = flops_per_image(config, train=True)
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    matmul, peak = matmul_tflops(device, dtype), peak_tflops(device)
    images = args.steps * t.micro_batch * t.grad_accum
    stamp = run_stamp(device)
    rows = []
    for name, seconds in times.items():
        per_step = statistics.median(seconds) / args.steps
        tflops = images / statistics.median(seconds) * flops / 1e12
        rows.append({**stamp, "config": config.name, "precision": t.precision, "micro_batch": t.micro_batch,
                     "contender": name, "switches": " ".join(variants.get(name, [])),
                     "ms_per_step": round(1000 * per_step, 3),
                     "ms_min": round(1000 * min(seconds) / args.steps, 3),
                     "ms_max": round(1000 * max(seconds) / args.steps, 3),
                     "images_per_s": round(images / statistics.median(seconds), 1),
                     "gflop_per_image": round(flops / 1e9, 4), "tflops": round(tflops, 4),
                     "mfu_vs_peak": round(tflops / peak, 4) if peak else "",
                     "mfu_vs_matmul": round(tflops / matmul, 4), "matmul_tflops": round(matmul, 3)})
    print(f"{stamp['device']}; {load_note()}")
    print(f"{config.name}, {t.precision}, micro-batch {t.micro_batch}, {flops / 1e9:.3g} GFLOP/image fwd+bwd; "
          f"matmul measured {matmul:.3g} TFLOP/s" + (f", data-sheet peak {peak} TFLOP/s" if peak else ""))
    for r in rows:
        print(f"  {r['contender']:<46} ms/step {summary(times[r['contender']], 1e3 / args.steps):>22}  "
              f"{r['images_per_s']:>9} img/s  {r['tflops']:.3g} TFLOP/s  MFU vs matmul {r['mfu_vs_matmul']:.1%}"
              + (f", vs peak {r['mfu_vs_peak']:.1%}" if peak else ""))
    ratio = statistics.median(times["plain"]) / statistics.median(times["trainer"])
    print(f"  trainer images/s = {ratio:.2f}x the plain loop's")
    for name in variants:
        if name != "trainer":
            gain = statistics.median(times["trainer"]) / statistics.median(times[name])
            print(f"  {name}: images/s = {gain:.2f}x the trainer with every switch off")
    append_csv(args.csv, rows)
    if args.profile:
        profile_trainers(trainers, batch, args.steps, Path(args.csv).with_name("train_profile.csv"),
                         {**stamp, "config": config.name, "precision": t.precision, "micro_batch": t.micro_batch})


def profile_trainers(trainers: dict, batch, steps: int, csv_path: Path, stamp: dict) -> None:
    from benchmarks.profile_breakdown import breakdown

    rows = []
    for name, trainer in trainers.items():
        accum = trainer.config.train.grad_accum
        parts, wall = breakdown(lambda: trainer.train_step([batch] * accum), trainer.device, steps)
        print(f"  profile of {name}: {wall:.3g} ms/step")
        for part in parts:
            print(f"    {part['category']:<46} {part['ms_per_step']:>9.3f} ms  {part['share_of_wall']:>6.1%}")
            rows.append({**stamp, "contender": name, **part, "wall_ms_per_step": round(wall, 3)})
    append_csv(csv_path, rows)


if __name__ == "__main__":
    main()
