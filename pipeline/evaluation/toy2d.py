"""A 2-D benchmark with a known density, through the whole path: points in shards -> training -> sampler.

    python -m pipeline.evaluation.toy2d --density ring8 --out runs/toy2d      # prints one JSON line

Each point is stored as a 1x2 8-bit grey PNG in the project's shard format (pixel = round((x + 1) 127.5)),
read back with the evaluation reader, dequantised uniformly inside its bin (width 2/255, far below the
densities' scale), and fitted by a small MLP denoiser trained with the SHARED loss
(`pipeline.diffusion.losses.training_losses`, counter-based noise) and sampled with the SHARED samplers
(`pipeline.diffusion.samplers.sample`). The image trainer cannot serve here (its loader makes square images
and its models are the UNet/VAE); the MLP is the only part of its own.

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

from pipeline.data import shards
from pipeline.evaluation import EvaluationError, metrics


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
    pixels = torch.round((points + 1) * 127.5).to(torch.uint8).numpy()
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
    return images.reshape(-1, 2).double() / 127.5 - 1


# ---------------------------------------------------------------------------------------- the model
class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) (or the config's other prediction) for points: Fourier features of x and a
    sinusoidal t embedding, then an SiLU MLP.

    The Fourier features (sin/cos of pi 2^k x) let a small MLP resolve modes much narrower than the data
    range within a CI-sized budget: on the 8-Gaussian ring (eps target), 1500 steps reach an energy
    distance of ~7e-4 with them and ~2e-2 without (no better than a single fitted Gaussian)."""

    def __init__(self, hidden: int = 128, depth: int = 3, time_dim: int = 32, num_freqs: int = 6):
        super().__init__()
        self.time_dim = time_dim
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32))
        layers, width = [], 2 + 4 * num_freqs + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        from pipeline.models.unet import timestep_embedding

        angles = (x[:, :, None] * self.freqs).flatten(1)
        features = [x, angles.sin(), angles.cos(), timestep_embedding(t, self.time_dim)]
        return self.net(torch.cat(features, dim=1))


@dataclass
class ToyConfig:
    density: str = "ring8"
    num_train: int = 8192
    train_steps: int = 1500
    batch_size: int = 512
    lr: float = 3e-3
    timesteps: int = 1000
    schedule: str = "linear"
    # v, not eps: at 1500 steps KL(p || model) is 0.48 nats with v and 2.4 with eps (eps is poor at small t)
    prediction: str = "v"
    seed: int = 0


def train_denoiser(points: torch.Tensor, config: ToyConfig) -> MLPDenoiser:
    """Adam + cosine decay on the shared MSE loss (eps, x0 or v target), batches of dequantised points."""
    from pipeline.diffusion.losses import training_losses
    from pipeline.diffusion.schedule import make_schedule

    torch.manual_seed(config.seed)
    model = MLPDenoiser()
    schedule = make_schedule(config.schedule, config.timesteps)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.train_steps, eta_min=config.lr * 0.05)
    gen = torch.Generator().manual_seed(config.seed)
    data = points.float()
    for step in range(config.train_steps):
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        x0 = data[idx] + (torch.rand(config.batch_size, 2, generator=gen) - 0.5) * (2 / 255)
        t = torch.randint(config.timesteps, (config.batch_size,), generator=gen)
        ids = torch.arange(step * config.batch_size, (step + 1) * config.batch_size)
        loss = training_losses(model, x0, t, schedule, seed=config.seed, sample_ids=ids, stream=1_000_000 + step,
                               prediction=config.prediction, backend="torch").loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    return model.eval()


# ---------------------------------------------------------------------------------------- evaluation
def sample_points(model: MLPDenoiser, config: ToyConfig, num: int, *, sampler: str, steps: int,
                  seed: int) -> torch.Tensor:
    from pipeline.diffusion.samplers import sample
    from pipeline.diffusion.schedule import make_schedule

    schedule = make_schedule(config.schedule, config.timesteps)
    return sample(model, (num, 2), schedule, sampler=sampler, steps=steps, prediction=config.prediction,
                  clip_x0=True, seed=seed, backend="torch").double()


def model_nll(model: MLPDenoiser, config: ToyConfig, points: torch.Tensor, ode_steps: int = 100,
              t_start: int = 0) -> torch.Tensor:
    """-log p_model,t(x) in nats per point from the probability-flow ODE (exact divergence), at time t_start."""
    from pipeline.diffusion.likelihood import ode_nll
    from pipeline.diffusion.schedule import make_schedule

    schedule = make_schedule(config.schedule, config.timesteps)
    return ode_nll(model, points.float(), schedule, prediction=config.prediction, trace="exact",
                   steps=ode_steps, t_start=float(t_start))["nats"].double()


def kl_estimates(model: MLPDenoiser, config: ToyConfig, density: GaussianMixture2D, points: torch.Tensor,
                 ode_steps: int, t_start: int, generator: torch.Generator) -> dict:
    """KL(p_t || p_model,t) ~ E[-log p_model,t(x_t)] - E[-log p_t(x_t)] over true x_t, at t = 0 and t_start.

    At t = 0 the model's density hinges on its least accurate region (the noise levels far below the modes'
    width); at a small t_start > 0 both densities are smoothed by the same, exactly known, noise."""
    from pipeline.diffusion.schedule import make_schedule

    alpha_bar = float(make_schedule(config.schedule, config.timesteps).alphas_cumprod64[t_start])
    noisy = math.sqrt(alpha_bar) * points + math.sqrt(1 - alpha_bar) * torch.randn(
        points.shape, generator=generator, dtype=torch.float64)
    result = {}
    for t, x, law in ((0, points, density), (t_start, noisy, density.noised(alpha_bar))):
        nll = float(model_nll(model, config, x, ode_steps, t_start=t).mean())
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
    """Write true points into shards at `folder`, train from the shards, sample, and score everything."""
    density = make_density(config.density)
    gen = torch.Generator().manual_seed(config.seed)
    write_point_shards(folder, density.sample(config.num_train, gen).clamp(-1, 1), config.density)
    start = time.perf_counter()
    model = train_denoiser(read_points(folder), config)
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
        samples = sample_points(model, config, num_eval, sampler=name, steps=steps, seed=config.seed + 1)
        scores = sample_scores(samples, density, reference)
        scores["seconds_per_1k"] = round((time.perf_counter() - start) * 1000 / num_eval, 4)
        result[f"{name}{steps}"] = scores
    nll_points = reference[:500]
    result.update(kl_estimates(model, config, density, nll_points, ode_steps, kl_t_start, gen))
    true_nll = float(-density.log_prob(nll_points).mean())
    result["gaussian_baseline"]["kl_estimate_t0"] = float(-baseline.log_prob(nll_points).mean()) - true_nll
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="2-D known-density benchmark: shards -> training -> sampler")
    parser.add_argument("--density", choices=sorted(DENSITIES), default="ring8", help="true distribution")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the point shards")
    parser.add_argument("--train-steps", type=int, default=ToyConfig.train_steps, help="optimizer steps")
    parser.add_argument("--num-train", type=int, default=ToyConfig.num_train, help="training points")
    parser.add_argument("--num-eval", type=int, default=2000, help="samples per metric")
    parser.add_argument("--samplers", default="ddim:50,dpmpp:20,ddpm:1000",
                        help="comma-separated sampler:steps pairs to score")
    parser.add_argument("--prediction", choices=["eps", "x0", "v"], default=ToyConfig.prediction,
                        help="what the MLP predicts")
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
