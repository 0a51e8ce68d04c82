"""Noise schedules of the discrete VP diffusion q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Every quantity is computed in float64 from the betas and then cast to float32, so the table a kernel reads is
the correctly rounded value, not the product of 1000 float32 roundings. A `Schedule` also remembers which
ORIGINAL timesteps it covers: `respace` keeps a subset of steps (for fast samplers) and rebuilds the betas of
the shorter chain so that its alpha-bars equal the original ones at the kept steps (improved DDPM, sec. 4).
The model is always called with the original timestep index (`schedule.timesteps[i]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from pipeline.conventions import SCHEDULES, SPACINGS



def _linear_betas(timesteps: int) -> np.ndarray:
    # DDPM: 1e-4 .. 0.02 over T = 1000; for other T keep the same total noise (improved DDPM's scaling).
    scale = 1000.0 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def _cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Improved DDPM: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2); betas clipped at 0.999 near t = T.
    def alpha_bar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    betas = 1.0 - alpha_bar(u[1:]) / alpha_bar(u[:-1])
    return np.clip(betas, 0.0, max_beta)


def _scaled_linear_betas(timesteps: int) -> np.ndarray:
    # Latent diffusion / Stable Diffusion: linear in sqrt(beta) from 0.00085 to 0.012 (scaled to T as above).
    scale = 1000.0 / timesteps
    return np.linspace(math.sqrt(scale * 0.00085), math.sqrt(scale * 0.012), timesteps, dtype=np.float64) ** 2


def _sigmoid_betas(timesteps: int, start: float = -6.0, end: float = 6.0) -> np.ndarray:
    # GeoDiff / "sigmoid" schedule: betas follow a sigmoid between 1e-4 and 0.02 (scaled to T as above).
    scale = 1000.0 / timesteps
    sig = 1.0 / (1.0 + np.exp(-np.linspace(start, end, timesteps, dtype=np.float64)))
    return scale * (1e-4 + (0.02 - 1e-4) * sig)


_BETA_FNS = {"linear": _linear_betas, "cosine": _cosine_betas, "scaled_linear": _scaled_linear_betas,
             "sigmoid": _sigmoid_betas}


@dataclass
class Schedule:
    """All per-step tensors of a diffusion chain, float32 (plus `alphas_cumprod64`, the float64 source).

    Index i of every tensor is step i of THIS chain; `timesteps[i]` is the timestep the model saw in training.
    """

    timesteps: torch.Tensor  # (S,) int64, original timestep index of each step, increasing
    num_train_timesteps: int  # T of the training chain (the model's time range)
    alphas_cumprod64: torch.Tensor  # (S,) float64
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{i-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta_tilde_i = (1 - ab_{i-1}) / (1 - ab_i) * beta_i
    posterior_log_variance_clipped: torch.Tensor  # log beta_tilde with beta_tilde_0 := beta_tilde_1 (it is 0)
    posterior_mean_coef1: torch.Tensor  # multiplies x_0
    posterior_mean_coef2: torch.Tensor  # multiplies x_t

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def __len__(self) -> int:
        return self.num_steps

    def to(self, device) -> "Schedule":
        """A copy with every tensor on `device` (the float64 source too, for on-device table building)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Schedule(**moved)

    def respace(self, steps: int | Sequence[int], spacing: str = "linear") -> "Schedule":
        """A shorter chain over a subset of this chain's steps.

        `steps` is a count or an explicit list of step indices of THIS chain. A count chooses the steps by
        `spacing`: "linear" keeps the first and the last step and spaces the others evenly in t; "trailing"
        (Lin et al. 2024) keeps the last step and every (T/steps)-th before it, so no step is spent at t = 0,
        where linear spacing's final step changes almost nothing; "logsnr" spaces them evenly in log-SNR
        (nearest steps, duplicates dropped: DPM-Solver's recommended spacing, much better for few-step ODE
        solvers on the linear schedule, whose log-SNR changes fastest near t = 0). The new betas are
        1 - ab[k_j] / ab[k_{j-1}], so the marginals q(x_t | x_0)
        at the kept steps are unchanged and the chain's posteriors are the exact ones between kept steps.
        """
        ab_all = self.alphas_cumprod64.detach().cpu().numpy()
        keep = _steps_to_keep(steps, ab_all, spacing)
        ab = ab_all[keep]
        return _build(ab, self.timesteps.detach().cpu()[keep], self.num_train_timesteps).to(self.device)

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at a continuous (float) training timestep, float64.

        Interpolates log(sigma_bar) = 0.5 * log((1 - ab) / ab) linearly between integer steps (it is monotone
        and smooth, unlike ab); integer t gives exactly the table value. Used by the probability-flow ODE.
        """
        log_sigma = self._log_sigma_table(t.device)
        tt = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = tt.floor().clamp(max=self.num_train_timesteps - 2).long()
        frac = tt - lo
        ls = log_sigma[lo] * (1 - frac) + log_sigma[lo + 1] * frac
        return torch.sigmoid(-2 * ls)  # ab = 1 / (1 + sigma_bar^2)

    def t_from_log_sigma(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of `alpha_bar_at` in terms of log sigma_bar: the continuous timestep (float64)."""
        table = self._log_sigma_table(log_sigma.device)
        ls = log_sigma.to(torch.float64).clamp(table[0], table[-1])
        hi = torch.searchsorted(table, ls.reshape(-1)).clamp(1, table.numel() - 1).reshape(ls.shape)
        lo = hi - 1
        frac = (ls - table[lo]) / (table[hi] - table[lo])
        return lo.to(torch.float64) + frac

    def _log_sigma_table(self, device) -> torch.Tensor:
        if self.num_steps != self.num_train_timesteps:
            raise ValueError("continuous time is defined on the full training chain, not a respaced one")
        ab = self.alphas_cumprod64.to(device)
        return 0.5 * (torch.log1p(-ab) - torch.log(ab))




def _steps_to_keep(steps: int | Sequence[int], alphas_cumprod: np.ndarray, spacing: str) -> np.ndarray:
    num_steps = len(alphas_cumprod)
    if spacing not in SPACINGS:
        raise ValueError(f"respace: spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps, (int, np.integer)):
        if not 1 <= steps <= num_steps:
            raise ValueError(f"respace: steps must be in [1, {num_steps}], got {steps}")
        if spacing == "linear":
            return np.unique(np.round(np.linspace(0, num_steps - 1, int(steps))).astype(np.int64))
        if spacing == "trailing":  # Lin et al. 2024: start at the last step, stride T/steps; no step at t = 0
            return np.unique(np.round(np.arange(num_steps, 0, -num_steps / int(steps))).astype(np.int64) - 1)
        log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
        targets = np.linspace(log_snr[0], log_snr[-1], int(steps))
        return np.unique(np.abs(log_snr[None, :] - targets[:, None]).argmin(axis=1))
    else:
        keep = np.asarray(sorted(set(int(s) for s in steps)), dtype=np.int64)
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= num_steps:
            raise ValueError(f"respace: step indices must lie in [0, {num_steps}), got {list(steps)}")
    return keep


def _build(alphas_cumprod: np.ndarray, timesteps: torch.Tensor, num_train_timesteps: int) -> Schedule:
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alphas = ab / ab_prev
    betas = 1.0 - alphas
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # beta_tilde_0 = 0; improved DDPM clips its log to beta_tilde_1 (only the VLB's decoder term reads it)
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(ab) > 1 else np.log(betas)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(torch.float32)

    return Schedule(
        timesteps=torch.as_tensor(timesteps, dtype=torch.int64),
        num_train_timesteps=int(num_train_timesteps),
        alphas_cumprod64=torch.from_numpy(ab.copy()),
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(ab),
        alphas_cumprod_prev=f32(ab_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ab)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
        posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
    )


def make_schedule(name: str = "linear", timesteps: int = 1000) -> Schedule:
    """The schedule `name` (one of SCHEDULES) over `timesteps` steps."""
    if name not in _BETA_FNS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if int(timesteps) < 2:
        raise ValueError(f"schedule needs at least 2 timesteps, got {timesteps}")
    betas = _BETA_FNS[name](int(timesteps))
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"schedule {name!r} with T={timesteps} gives betas outside (0, 1)")
    return from_betas(betas)


def from_betas(betas) -> Schedule:
    """A schedule from explicit betas (float64 recommended)."""
    betas = np.asarray(betas, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    return _build(ab, torch.arange(len(betas)), len(betas))
