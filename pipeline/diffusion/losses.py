"""Training losses and the terms of the variational bound.

- `training_losses`: the simple loss of DDPM (Algorithm 1) for an eps / x0 / v prediction, optionally weighted
  per sample by min-SNR-gamma (Hang et al. 2023) and by importance weights; noising and loss run through the
  fused `kernels.q_sample` / `kernels.diffusion_loss` ops with counter-based noise (no noise tensor stored).
- `normal_kl`, `discretized_gaussian_log_likelihood`, `vlb_term`, `prior_kl`: the terms L_T, L_{t-1}, L_0 of
  the bound (DDPM eq. 5; discretised Gaussian decoder for L_0, improved DDPM), in nats per sample.
- `sample_timesteps` (uniform) and `LossAwareSampler` (importance sampling of t by the loss history).
"""
from __future__ import annotations

import numpy as np
import torch

from . import process
from .schedule import Schedule

WEIGHTINGS = ("none", "min_snr")
NUM_BUCKETS = 4  # timestep quartiles for logging


# ----------------------------------------------------------------------------------------------- simple loss
def min_snr_weights(alpha_bar: torch.Tensor, prediction: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights that turn the `prediction` MSE into min(SNR, gamma) * ||x0 - x0_hat||^2.

    SNR = a / (1 - a). The eps-MSE equals SNR * x0-MSE, the v-MSE equals (SNR + 1) * x0-MSE, so the weight
    is min(SNR, gamma) divided by that factor (Hang et al. 2023, eq. 9 and its v variant).
    """
    process.check_prediction(prediction)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def timestep_buckets(t: torch.Tensor, num_timesteps: int, num_buckets: int = NUM_BUCKETS) -> torch.Tensor:
    """The quartile (for 4 buckets) of each timestep, int64, for per-noise-level loss logging."""
    return torch.clamp(t.long() * num_buckets // num_timesteps, 0, num_buckets - 1)


def training_losses(model, x0: torch.Tensor, t: torch.Tensor, schedule: Schedule, *, seed: int,
                    sample_ids: torch.Tensor, stream: int, prediction: str = "eps", y=None,
                    weighting: str = "none", min_snr_gamma: float = 5.0, importance_weights=None,
                    backend=None):
    """One DDPM training loss: x_t = q_sample(x0, ab_t, noise(seed, stream, sample_id)), MSE to the target.

    `model(x_t, t, y)` predicts `prediction`; `t` (B,) int64 indexes the (full) schedule. Returns the kernels'
    `LossOutput(loss, per_sample, bucket_sums, bucket_counts)` with buckets = timestep quartiles.
    """
    import kernels  # lazily: importing triton (and so kernels) must wait until TRITON_INTERPRET is decided

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    process.check_prediction(prediction)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    t = t.to(x0.device)
    alpha_bar = schedule.alphas_cumprod.to(x0.device)[t]
    weights = None
    if weighting == "min_snr":
        weights = min_snr_weights(alpha_bar, prediction, min_snr_gamma)
    if importance_weights is not None:
        iw = importance_weights.to(x0.device, torch.float32)
        weights = iw if weights is None else weights * iw
    with torch.no_grad():
        x_t = kernels.q_sample(x0, alpha_bar, seed, sample_ids, stream, backend=backend)
    model_out = model(x_t, t, y)
    buckets = timestep_buckets(t, schedule.num_train_timesteps)
    return kernels.diffusion_loss(model_out, x0, alpha_bar, seed, sample_ids, stream, target=prediction,
                                  weights=weights, buckets=buckets, num_buckets=NUM_BUCKETS, backend=backend)


# ------------------------------------------------------------------------------------------ variational bound
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_prob_between(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds, accurate in both tails."""
    right_tail = lower > 0  # subtract upper-tail masses there: Phi(u) - Phi(l) = Phi(-l) - Phi(-u)
    hi = torch.where(right_tail, -lower, upper)
    lo = torch.where(right_tail, -upper, lower)
    return torch.log(torch.clamp(torch.special.ndtr(hi) - torch.special.ndtr(lo), min=1e-12))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """log P(x) elementwise for x on the grid of `num_bins` values in [-1, 1] under a Gaussian binned there.

    Bins have width 2 / (num_bins - 1) around each grid value; the edge bins extend to -inf / +inf (DDPM's
    decoder L_0). Uses the exact normal CDF.
    """
    if x.shape != means.shape:
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} must have the same shape")
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = (x - means + half_bin) * inv_std
    lower = (x - means - half_bin) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # first bin: (-inf, -1 + half]
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # last bin: [1 - half, inf)
    middle = _log_prob_between(lower, upper)
    return torch.where(x < -1 + 1e-3, log_cdf_upper, torch.where(x > 1 - 1e-3, log_one_minus_cdf_lower, middle))


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def model_log_variance(schedule: Schedule, variance: str) -> torch.Tensor:
    """log sigma_t^2 of the fixed-variance reverse process: "beta_tilde" (posterior) or "beta" (DDPM's upper
    choice; its step 0 uses beta_tilde_1 as in improved DDPM, since beta_0 would make L_0 too loose)."""
    if variance == "beta_tilde":
        return schedule.posterior_log_variance_clipped
    if variance == "beta":
        first = schedule.posterior_variance[1:2] if schedule.num_steps > 1 else schedule.betas[:1]
        return torch.log(torch.cat([first, schedule.betas[1:]]))
    raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")


def prior_kl(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, nats (no parameters: the schedule's last step)."""
    a = schedule.alphas_cumprod64[-1].to(x0.device, torch.float64)
    mean = a.sqrt() * x0.double()
    logvar = torch.log1p(-a).expand_as(mean)
    return sum_except_batch(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))).float()


def vlb_term(model_fn, x0: torch.Tensor, step: torch.Tensor, schedule: Schedule, noise: torch.Tensor, *,
             prediction: str = "eps", variance: str = "beta_tilde", y=None, clip_x0: bool = False):
    """L_{step-1} per sample in nats: KL(q(x_{s-1} | x_s, x_0) || p(x_{s-1} | x_s)) for step s > 0 and the
    discretised decoder NLL -log p(x_0 | x_1) for s = 0. `step` (B,) indexes `schedule` (respaced or not);
    the model sees `schedule.timesteps[step]`."""
    step = step.to(x0.device)
    alpha_bar = schedule.alphas_cumprod.to(x0.device)[step]
    x_t = process.q_sample(x0, alpha_bar, noise)
    out = model_fn(x_t, schedule.timesteps.to(x0.device)[step], y)
    x0_hat = process.to_x0(out, x_t, alpha_bar, prediction)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    true_mean, _, true_logvar = process.posterior_mean_variance(x0, x_t, step, schedule)
    model_mean, _, _ = process.posterior_mean_variance(x0_hat, x_t, step, schedule)
    model_logvar = process.gather(model_log_variance(schedule, variance), step, x_t).expand_as(x_t)
    kl = sum_except_batch(normal_kl(true_mean, true_logvar, model_mean, model_logvar))
    decoder_nll = -sum_except_batch(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar))
    return torch.where(step == 0, decoder_nll, kl)


# ------------------------------------------------------------------------------------------ timestep sampling
def sample_timesteps(batch_size: int, num_timesteps: int, *, generator=None, device=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, (B,) int64."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)


class LossAwareSampler:
    """Importance sampling of t with p_t proportional to sqrt(E[L_t^2]) (improved DDPM, sec. 3.3).

    Keeps the last `history` losses of every timestep (host side); until every timestep has a full history it
    samples uniformly. `sample` returns (t, weights) with weights = 1 / (T p_t), so the weighted mean loss is
    an unbiased estimate of the uniform-t loss. A little uniform probability keeps every t reachable.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        if num_timesteps < 1 or history < 1 or not 0 < uniform_prob <= 1:
            raise ValueError("LossAwareSampler needs num_timesteps >= 1, history >= 1, 0 < uniform_prob <= 1")
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self._losses = np.zeros((num_timesteps, history), dtype=np.float64)
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        if not np.all(self._counts >= self._losses.shape[1]):
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        w = np.sqrt(np.mean(self._losses ** 2, axis=1))
        w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / self.num_timesteps)
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, *, generator=None, device=None):
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device, torch.float32)

    def update(self, t, losses) -> None:
        """Record per-sample losses (unweighted) of timesteps t (tensors or arrays; moved to the host)."""
        t = np.asarray(torch.as_tensor(t).detach().cpu(), dtype=np.int64).reshape(-1)
        losses = np.asarray(torch.as_tensor(losses).detach().float().cpu(), dtype=np.float64).reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"update: {t.size} timesteps but {losses.size} losses")
        for step, loss in zip(t, losses):
            h = self._losses.shape[1]
            if self._counts[step] >= h:
                self._losses[step, :-1] = self._losses[step, 1:]
                self._losses[step, -1] = loss
            else:
                self._losses[step, self._counts[step]] = loss
            self._counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self._losses.copy(), "counts": self._counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._losses = np.array(state["losses"], dtype=np.float64)
        self._counts = np.array(state["counts"], dtype=np.int64)
