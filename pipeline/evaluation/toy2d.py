"""A 2-D benchmark with a known density, through the whole path: points in shards -> training -> sampler.

    python -m pipeline.evaluation.toy2d --density ring8 --out runs/toy2d      # prints one JSON line

Each point is stored as a 1x2 8-bit grey PNG in the project's shard format (pixel = round((x + 1) 127.5)),
trained by the project's trainer (`python -m pipeline train --config configs/toy2d.yaml`: the streaming loader
reads the points as 1x2 images, the DeepSpeed engine trains an MLP denoiser with the shared loss and
counter-based noise) and sampled from its EMA export with the SHARED samplers
(`pipeline.diffusion.samplers.sample`).

Metrics against the truth: energy distance and MMD of samples to fresh true points (with the same
statistic between two fresh true sets as the noise floor), the cross-entropy of the samples under the true
density, and the model's probability-flow-ODE NLL of fresh true points (exact divergence in 2-D), whose gap
to the true entropy estimates KL(p_true || p_model) >= 0. All in nats per point.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.conventions import PREDICTIONS
from pipeline.data import shards

REPO = Path(__file__).resolve().parents[2]
from pipeline.evaluation import EvaluationError, metrics
from pipeline.images import to_levels, to_model_range


# ------------------------------------------------------------------------------------------- densities
@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-weight isotropic Gaussians: sample and exact log-density."""

    means: tuple[tuple[float, float], ...]
    std: float

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        centres = torch.tensor(self.means, dtype=torch.float64)
        which = torch.randint(len(centres), (n,), generator=generator)
        return centres[which] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def noised(self, alpha_bar: float) -> "GaussianMixture2D":
        """The law of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps: again an isotropic mixture, known exactly."""
        scale = math.sqrt(alpha_bar)
        means = tuple((scale * mx, scale * my) for mx, my in self.means)
        return GaussianMixture2D(means, math.sqrt(alpha_bar * self.std ** 2 + 1 - alpha_bar))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor(self.means, dtype=torch.float64)
        sq = (x.double()[:, None, :] - centres[None]).square().sum(-1)
        log_components = -sq / (2 * self.std ** 2) - math.log(2 * math.pi * self.std ** 2)
        return torch.logsumexp(log_components, dim=1) - math.log(len(centres))


def ring_mixture(count: int = 8, radius: float = 0.6, std: float = 0.05) -> GaussianMixture2D:
    angles = [2 * math.pi * k / count for k in range(count)]
    return GaussianMixture2D(tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles), std)


def two_moons(noise: float = 0.04, arc_points: int = 1024) -> GaussianMixture2D:
    """Two interleaved half circles (sklearn's make_moons, scaled into [-1, 1]) plus Gaussian noise.
    Uniform on the arcs, the density is a continuous mixture; `arc_points` quadrature nodes spaced ~10x
    finer than `noise` make the mixture form exact to well below sampling error."""
    theta = (np.arange(arc_points // 2) + 0.5) * math.pi / (arc_points // 2)
    upper = np.stack([np.cos(theta), np.sin(theta)], 1)
    lower = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1)
    arcs = (np.concatenate([upper, lower]) - [0.5, 0.25]) * 0.6  # centred, within about [-0.9, 0.9]
    return GaussianMixture2D(tuple(map(tuple, arcs.tolist())), noise)


DENSITIES = {"ring8": ring_mixture, "moons": two_moons}


def make_density(name: str) -> GaussianMixture2D:
    if name not in DENSITIES:
        raise EvaluationError(f"unknown 2-D density {name!r}; choose one of {sorted(DENSITIES)}")
    return DENSITIES[name]()


# --------------------------------------------------------------------------------- points <-> shards
def write_point_shards(folder: Path, points: torch.Tensor, density: str, per_shard: int = 4096) -> dict:
    """Points in [-1, 1]^2 as 1x2 8-bit PNGs in the shard format (values outside are refused)."""
    if points.abs().max() > 1:
        raise EvaluationError("points must lie in [-1, 1]^2 to be stored as 8-bit pixels")
    pixels = to_levels(points).numpy()
    with shards.ShardWriter(folder, max_count=per_shard) as writer:
        for i, pixel_pair in enumerate(pixels):
            writer.add(shards.make_sample(i, shards.encode_png(pixel_pair[None]), -1, {"source_index": i}))
    manifest = shards.make_manifest(source={"kind": "toy2d", "density": density}, image_size=(1, 2),
                                    channels=1, class_names=[], shards=writer.records)
    shards.write_manifest(folder, manifest)
    return manifest


def read_points(folder: Path) -> torch.Tensor:
    """(N, 2) float64 grid values in [-1, 1] (the pixel -> [-1, 1] map of the training loader)."""
    from pipeline.evaluation.shardset import read_image_set

    images = read_image_set(folder).images
    if tuple(images.shape[1:]) != (1, 1, 2):
        raise EvaluationError(f"{folder} does not hold 2-D points (1x2 grey images), its images are "
                              f"{tuple(images.shape[1:])}")
    return to_model_range(images.reshape(-1, 2), torch.float64)


# ---------------------------------------------------------------------------------------- training
@dataclass
class ToyConfig:
    density: str = "ring8"
    num_train: int = 8192
    train_steps: int = 1500
    # v, not eps: at 1500 steps KL(p || model) is 0.48 nats with v and 2.4 with eps (eps is poor at small t)
    prediction: str = "v"
    seed: int = 0


class PointModel(nn.Module):
    """The trained network seen on (N, 2) points instead of (N, 1, 1, 2) images."""

    def __init__(self, inference):
        super().__init__()
        self.net, self.diffusion = inference.model, inference.config.diffusion

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        return self.net(x.view(-1, 1, 1, 2), t).view(-1, 2)


def train_denoiser(shard_dir: Path, run_dir: Path, config: ToyConfig) -> PointModel:
    """Train with the project's trainer on the point shards; return the EMA export as a point model."""
    import os
    import subprocess
    import sys

    from pipeline.checkpoint import load_for_inference

    command = [sys.executable, "-m", "pipeline", "train", "--config", str(REPO / "configs/toy2d.yaml"),
               "--out", str(run_dir), f"data.shards={shard_dir}", f"train.steps={config.train_steps}",
               f"diffusion.prediction={config.prediction}", f"train.seed={config.seed}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise EvaluationError(f"training the 2-D model failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return PointModel(load_for_inference(run_dir)).eval()


# ---------------------------------------------------------------------------------------- evaluation
def schedule_of(model: PointModel):
    from pipeline.diffusion.schedule import make_schedule

    return make_schedule(model.diffusion.schedule, model.diffusion.timesteps)


def sample_points(model: PointModel, num: int, *, sampler: str, steps: int, seed: int,
                  spacing: str | None = None) -> torch.Tensor:
    from pipeline.diffusion.samplers import sample

    with torch.no_grad():
        return sample(model, (num, 2), schedule_of(model), sampler=sampler, steps=steps, spacing=spacing,
                      prediction=model.diffusion.prediction, clip_x0=True, seed=seed, backend="torch").double()


def model_nll(model: PointModel, points: torch.Tensor, ode_steps: int = 100, t_start: int = 0) -> torch.Tensor:
    """-log p_model,t(x) in nats per point from the probability-flow ODE (exact divergence), at time t_start."""
    from pipeline.diffusion.likelihood import ode_nll

    return ode_nll(model, points.float(), schedule_of(model), prediction=model.diffusion.prediction,
                   trace="exact", steps=ode_steps, t_start=float(t_start))["nats"].double()


def kl_estimates(model: PointModel, density: GaussianMixture2D, points: torch.Tensor, ode_steps: int,
                 t_start: int, generator: torch.Generator) -> dict:
    """KL(p_t || p_model,t) ~ E[-log p_model,t(x_t)] - E[-log p_t(x_t)] over true x_t, at t = 0 and t_start.

    At t = 0 the model's density hinges on its least accurate region (the noise levels far below the modes'
    width); at a small t_start > 0 both densities are smoothed by the same, exactly known, noise."""
    alpha_bar = float(schedule_of(model).alphas_cumprod64[t_start])
    noisy = math.sqrt(alpha_bar) * points + math.sqrt(1 - alpha_bar) * torch.randn(
        points.shape, generator=generator, dtype=torch.float64)
    result = {}
    for t, x, law in ((0, points, density), (t_start, noisy, density.noised(alpha_bar))):
        nll = float(model_nll(model, x, ode_steps, t_start=t).mean())
        result[f"model_nll_t{t}"] = nll
        result[f"kl_estimate_t{t}"] = nll - float(-law.log_prob(x).mean())
    return result


def sample_scores(samples: torch.Tensor, density: GaussianMixture2D, reference: torch.Tensor) -> dict:
    """Two-sample statistics of model samples against fresh true points, and their true cross-entropy."""
    return {"energy_distance": metrics.energy_distance(samples, reference),
            "mmd_rbf": metrics.mmd_rbf(samples, reference),
            "true_nll_of_samples": float(-density.log_prob(samples).mean())}


def gaussian_baseline(points: torch.Tensor) -> torch.distributions.MultivariateNormal:
    """The moment-matched single Gaussian: what a model that learned nothing but the mean and covariance
    would give. The benchmark's thresholds are set far below its scores."""
    return torch.distributions.MultivariateNormal(points.mean(0), torch.cov(points.T))


def run_benchmark(folder: Path, config: ToyConfig, *, num_eval: int = 2000,
                  samplers: tuple[tuple[str, int], ...] = (("ddim", 50),), ode_steps: int = 100,
                  kl_t_start: int = 10) -> dict:
    """Write true points into shards under `folder`, train from the shards, sample, and score everything."""
    density = make_density(config.density)
    gen = torch.Generator().manual_seed(config.seed)
    write_point_shards(folder / "points", density.sample(config.num_train, gen).clamp(-1, 1), config.density)
    start = time.perf_counter()
    model = train_denoiser(folder / "points", folder / "run", config)
    result = {"density": config.density, "num_train": config.num_train, "train_steps": config.train_steps,
              "num_eval": num_eval, "train_seconds": round(time.perf_counter() - start, 2)}
    reference, other_truth = density.sample(num_eval, gen), density.sample(num_eval, gen)
    result["floor"] = sample_scores(other_truth, density, reference)  # sampling noise of the statistics
    baseline = gaussian_baseline(reference)
    white = torch.randn(num_eval, 2, generator=gen, dtype=torch.float64)  # .sample() takes no generator
    result["gaussian_baseline"] = sample_scores(baseline.loc + white @ baseline.scale_tril.T, density, reference)
    result["true_entropy"] = float(-density.log_prob(reference).mean())
    for name, steps in samplers:
        start = time.perf_counter()
        samples = sample_points(model, num_eval, sampler=name, steps=steps, seed=config.seed + 1)
        scores = sample_scores(samples, density, reference)
        scores["seconds_per_1k"] = round((time.perf_counter() - start) * 1000 / num_eval, 4)
        result[f"{name}{steps}"] = scores
    nll_points = reference[:500]
    result.update(kl_estimates(model, density, nll_points, ode_steps, kl_t_start, gen))
    true_nll = float(-density.log_prob(nll_points).mean())
    result["gaussian_baseline"]["kl_estimate_t0"] = float(-baseline.log_prob(nll_points).mean()) - true_nll
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="2-D known-density benchmark: shards -> training -> sampler")
    parser.add_argument("--density", choices=sorted(DENSITIES), default="ring8", help="true distribution")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the point shards and the run")
    parser.add_argument("--train-steps", type=int, default=ToyConfig.train_steps, help="optimizer steps")
    parser.add_argument("--num-train", type=int, default=ToyConfig.num_train, help="training points")
    parser.add_argument("--num-eval", type=int, default=2000, help="samples per metric")
    parser.add_argument("--samplers", default="ddim:50,dpmpp:20,ddpm:1000",
                        help="comma-separated sampler:steps pairs to score")
    parser.add_argument("--prediction", choices=PREDICTIONS, default=ToyConfig.prediction,
                        help="what the MLP denoiser predicts")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation, batches and noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    samplers = tuple((name, int(steps)) for name, steps in (p.split(":") for p in args.samplers.split(",")))
    config = ToyConfig(density=args.density, num_train=args.num_train, train_steps=args.train_steps,
                       prediction=args.prediction, seed=args.seed)
    print(json.dumps(run_benchmark(args.out, config, num_eval=args.num_eval, samplers=samplers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
