"""The 2-D known-density benchmark as a table: density x sampler x steps -> distances to the truth.

    OMP_NUM_THREADS=1 python benchmarks/eval_toy2d.py [--densities ring8,moons] [--train-steps 3000]

For each density: true points -> shards -> MLP denoiser (shared loss) -> shared samplers at several step
counts. Prints energy distance, MMD and the samples' cross-entropy under the true density (minus the true
entropy: 0 is perfect), with the same statistics for a fresh true set (the noise floor) and for the
moment-matched Gaussian (a model that learned nothing else), then the model's ODE KL estimates.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import append_rows, device_name  # noqa: E402
from pipeline.evaluation import toy2d  # noqa: E402

SAMPLERS = (("ddpm", 1000), ("ddpm", 100), ("ddim", 50), ("ddim", 20), ("dpmpp", 20), ("dpmpp", 10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="ring8,moons", help="comma-separated densities")
    parser.add_argument("--train-steps", type=int, default=3000, help="optimizer steps per density")
    parser.add_argument("--num-eval", type=int, default=2000, help="samples per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'density':<7} {'sampler':<12} {'n':>5} {'energy':>9} {'mmd':>9} {'xent-H':>7} {'s/1k':>6}")
    results = []
    for name in args.densities.split(","):
        config = toy2d.ToyConfig(density=name, train_steps=args.train_steps)
        with tempfile.TemporaryDirectory() as folder:
            r = toy2d.run_benchmark(Path(folder), config, num_eval=args.num_eval, samplers=SAMPLERS)
        rows = [("true (floor)", r["floor"]), ("gaussian fit", r["gaussian_baseline"])]
        rows += [(f"{s}{k}", r[f"{s}{k}"]) for s, k in SAMPLERS]
        for label, scores in rows:
            print(f"{name:<7} {label:<12} {r['num_eval']:>5} {scores['energy_distance']:>9.5f} "
                  f"{scores['mmd_rbf']:>9.5f} {scores['true_nll_of_samples'] - r['true_entropy']:>7.3f} "
                  f"{scores.get('seconds_per_1k', float('nan')):>6.2f}")
        print(f"{name:<7} train {r['train_seconds']} s ({r['train_steps']} steps); ODE KL(p||model) at t=0: "
              f"{r['kl_estimate_t0']:.3f} nats (gaussian fit {r['gaussian_baseline']['kl_estimate_t0']:.3f}), "
              f"at t=10: {r['kl_estimate_t10']:.3f}")
        results += [{"density": name, "row": label, "num_eval": r["num_eval"], "train_steps": r["train_steps"],
                     "energy_distance": s["energy_distance"], "mmd_rbf": s["mmd_rbf"],
                     "true_nll_minus_entropy": s["true_nll_of_samples"] - r["true_entropy"],
                     "kl_estimate_t0": r["kl_estimate_t0"]} for label, s in rows]
    print("appended to", append_rows("eval_toy2d", results, device_name("cpu")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
