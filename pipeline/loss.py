"""Training objectives as objects (after NVlabs/edm `training/loss.py`): one per model type, each of which
draws what its objective needs (timesteps, label dropout, noise) and returns the loss of a micro-batch, so
the trainer never asks which model it trains.

Determinism: every draw is keyed by the run seed, the optimizer step and the GLOBAL sample id. A step's
global batch (micro_batch x ranks x accumulation steps) has ids 0..N-1; timesteps and label dropout are drawn
for all N from (seed, step) and each micro-batch takes its slice; the noise is counter-based on
(seed, NOISE_STREAM_BASE + step, sample id). So any split of the same global batch trains the same model.
The math lives in `pipeline.diffusion.losses` (and the fused `kernels` ops under it) and `pipeline.models.vae`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NOISE_STREAM_BASE = 1_000_000  # training noise streams; sampling uses 0..steps (see docs/ARCHITECTURE.md)


@dataclass(frozen=True)
class BatchSlice:
    """Where a micro-batch sits in its optimizer step: samples [lo, hi) of the step's `total`."""
    step: int
    total: int
    lo: int
    hi: int


class DiffusionLoss:
    """DDPM's simple loss for an eps / x0 / v prediction, optionally min-SNR weighted (config.diffusion)."""

    def __init__(self, config, schedule, device):
        d, m, t = config.diffusion, config.model, config.train
        self.schedule, self.device, self.seed = schedule, device, t.seed
        self.prediction, self.weighting, self.min_snr_gamma = d.prediction, d.weighting, d.min_snr_gamma
        self.num_classes, self.p_uncond = m.num_classes, m.p_uncond
        self.backend = None if t.loss_backend == "auto" else t.loss_backend

    def __call__(self, model, images: torch.Tensor, labels: torch.Tensor, part: BatchSlice):
        from pipeline.diffusion.losses import training_losses

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + part.step)
        t = torch.randint(0, self.schedule.num_train_timesteps, (part.total,), generator=g)[part.lo:part.hi]
        y = None
        if self.num_classes is not None:  # label dropout: the null class trains the unconditional model (CFG)
            drop = torch.rand(part.total, generator=g)[part.lo:part.hi] < self.p_uncond
            y = torch.where(drop, torch.full_like(labels, self.num_classes), labels).to(self.device)
        out = training_losses(model, images, t.to(self.device), self.schedule, seed=self.seed,
                              sample_ids=torch.arange(part.lo, part.hi, device=self.device),
                              stream=NOISE_STREAM_BASE + part.step, prediction=self.prediction, y=y,
                              weighting=self.weighting, min_snr_gamma=self.min_snr_gamma, backend=self.backend)
        return out.loss, {"bucket_sums": out.bucket_sums.detach(), "bucket_counts": out.bucket_counts.detach()}


class VAELoss:
    """The beta-weighted negative ELBO (config.model.kl_weight) of `pipeline.models.vae.VAE.loss`.

    Its reparameterisation noise comes from torch's global generator (seeded per rank from train.seed by the
    trainer), not from the counter-based noise: a VAE run is reproducible at a fixed world size only.
    """

    def __init__(self, config):
        self.beta = config.model.kl_weight

    def __call__(self, model, images: torch.Tensor, labels: torch.Tensor, part: BatchSlice):
        loss, metrics = model.module.loss(images, beta=self.beta)
        return loss, {k: float(v) for k, v in metrics.items()}
