"""Which timestep spacing samples most accurately at few steps, on the 2-D known-density benchmark.

    OMP_NUM_THREADS=1 python benchmarks/eval_spacing.py [--train-steps 0] [--num-eval 2000] [--seeds 3]

Samples DDIM (eta = 0) and DPM-Solver++(2M) at 10/20/50 steps with each spacing ("linear", "trailing",
"logsnr") on the linear 1000-step schedule of configs/toy2d.yaml and scores the samples against fresh true
points of the ring8 mixture: energy distance (lower is better; "floor" = two true samples) and the true
negative log-likelihood of the samples (nats/point; the true entropy is its floor). The denoiser is the EXACT
eps of the mixture (its noised law is known in closed form), so every difference is the sampler's
discretisation error, not a model's; --train-steps N > 0 instead trains the toy2d model through the real
trainer. Each cell is the mean and standard deviation over --seeds sampling seeds, each with its own fresh
reference set. Rows are appended to benchmarks/results/eval_spacing.csv (device, commit, date, versions).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import append_rows, device_name  # noqa: E402
from pipeline.diffusion.schedule import make_schedule  # noqa: E402
from pipeline.evaluation import toy2d  # noqa: E402

class ExactDenoiser(torch.nn.Module):
    """eps(x_t, t) = -sqrt(1 - ab_t) grad log p_t(x_t) of a Gaussian mixture, exactly."""

    def __init__(self, density, schedule):
        super().__init__()
        self.density, self.alpha_bar = density, schedule.alphas_cumprod64

    def forward(self, x, t, y=None):
        ab = float(self.alpha_bar[int(t[0])])
        with torch.enable_grad():
            x = x.detach().double().requires_grad_(True)
            score, = torch.autograd.grad(self.density.noised(ab).log_prob(x).sum(), x)
        return (-(1 - ab) ** 0.5 * score).float()


def denoiser(args) -> str:
    return f"trained ({args.checkpoint})" if args.checkpoint else "exact" if args.train_steps == 0 else "trained"


GRID = [(sampler, spacing) for sampler in ("ddim", "dpmpp") for spacing in ("linear", "trailing", "logsnr")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=0, help="0: the exact denoiser; N: a model trained N steps")
    parser.add_argument("--checkpoint", default=None, help="a trained toy2d run or export to use instead")
    parser.add_argument("--num-eval", type=int, default=2000, help="samples (and true points) per score")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per cell (the spread)")
    parser.add_argument("--steps", default="10,20,50", help="comma-separated step counts")
    args = parser.parse_args()
    config = toy2d.ToyConfig(train_steps=args.train_steps)
    density = toy2d.make_density(config.density)
    device = device_name("cpu")
    if args.checkpoint:
        from pipeline.checkpoint import load_for_inference

        model = toy2d.PointModel(load_for_inference(args.checkpoint)).eval()
    elif args.train_steps == 0:
        model = ExactDenoiser(density, make_schedule("linear", 1000))
        model.diffusion = SimpleNamespace(schedule="linear", timesteps=1000, prediction="eps")
    else:
        model = None
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            gen = torch.Generator().manual_seed(config.seed)
            toy2d.write_point_shards(Path(tmp) / "points", density.sample(config.num_train, gen).clamp(-1, 1),
                                     config.density)
            model = toy2d.train_denoiser(Path(tmp) / "points", Path(tmp) / "run", config)
    references = [density.sample(args.num_eval, torch.Generator().manual_seed(100 + s)) for s in range(args.seeds)]
    floor = [toy2d.sample_scores(density.sample(args.num_eval, torch.Generator().manual_seed(200 + s)), density,
                                 ref)["energy_distance"] for s, ref in enumerate(references)]
    print(f"{device}; {config.density}, {denoiser(args)}, {args.train_steps} training steps, n={args.num_eval}, {args.seeds} seeds; "
          f"floor energy distance {statistics.mean(floor):.5f}; true entropy "
          f"{float(-density.log_prob(references[0]).mean()):.3f} nats")
    print("| sampler | spacing | steps | energy distance | true NLL of samples |\n|---|---|---|---|---|")
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for sampler, spacing in GRID:
            scores = [toy2d.sample_scores(toy2d.sample_points(model, args.num_eval, sampler=sampler, steps=steps,
                                                              seed=1 + s, spacing=spacing), density, ref)
                      for s, ref in enumerate(references)]
            ed = [r["energy_distance"] for r in scores]
            nll = [r["true_nll_of_samples"] for r in scores]
            row = {"sampler": sampler, "spacing": spacing, "steps": steps, "num_eval": args.num_eval,
                   "denoiser": denoiser(args),
                   "seeds": args.seeds, "train_steps": args.train_steps,
                   "energy_distance_mean": statistics.mean(ed), "energy_distance_std": statistics.stdev(ed),
                   "true_nll_mean": statistics.mean(nll), "true_nll_std": statistics.stdev(nll),
                   "floor_energy_distance": statistics.mean(floor)}
            rows.append(row)
            print(f"| {sampler} | {spacing} | {steps} | {row['energy_distance_mean']:.5f} ± "
                  f"{row['energy_distance_std']:.5f} | {row['true_nll_mean']:.3f} ± {row['true_nll_std']:.3f} |",
                  flush=True)
    print("appended to", append_rows("eval_spacing", rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
