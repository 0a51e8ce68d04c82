"""Samplers on one model interface: DDPM ancestral, DDIM(eta), DPM-Solver++(2M), Langevin corrector, CFG.

Every update is linear in (x0_hat, x0_hat of the previous step, x_t) plus fresh noise, so each sampler is
just a coefficient table (steps x 6, rows in sampling order, columns
[sqrt_ab_t, sqrt_1m_ab_t, c_x0, c_x0_prev, c_xt, sigma]) fed to the fused `kernels.sampler_update`:

    x_next = c_x0 * x0_hat + c_x0_prev * x0_hat_prev + c_xt * x_t + sigma * noise(seed, stream, sample_id)

The table is built once in float64 from the (respaced) schedule and moved to the device before the loop; the
loop indexes it with Python ints and draws noise from counter-based streams (0 = x_T, k = step k), so it makes
no host-device synchronisation and a sample depends only on (seed, sample_id), never on the batch.

Sampling runs over the steps of the chain from the last (i = S-1) to the first (i = 0); at step i the next
level is ab_prev = ab[i-1], and ab_prev = 1 (clean data) after step 0, where every sampler returns x0_hat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.conventions import DEFAULT_SPACING, SAMPLERS

from . import process
from .schedule import Schedule

DDPM_VARIANCES = ("beta", "beta_tilde")
COLUMNS = ("sqrt_ab_t", "sqrt_1m_ab_t", "c_x0", "c_x0_prev", "c_xt", "sigma")


# -------------------------------------------------------------------------------------- coefficient tables
def _levels(schedule: Schedule):
    """ab_t and ab_prev (float64, sampling order: first row = noisiest step)."""
    ab = schedule.alphas_cumprod64.detach().cpu().numpy().astype(np.float64)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return ab[::-1].copy(), ab_prev[::-1].copy()


def _table(ab_t, c_x0, c_x0_prev, c_xt, sigma) -> np.ndarray:
    return np.stack([np.sqrt(ab_t), np.sqrt(1 - ab_t), c_x0, c_x0_prev, c_xt, sigma], axis=1)


def ddpm_table(schedule: Schedule, variance: str = "beta_tilde") -> np.ndarray:
    """Ancestral DDPM: x_{t-1} = mu_tilde(x0_hat, x_t) + sigma_t z with sigma_t^2 = beta_tilde_t or beta_t
    (Ho et al. eq. 7 and sec. 3.2); no noise is added at the last step (it returns the mean = x0_hat)."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"ddpm_variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    ab_t, ab_prev = _levels(schedule)
    beta = 1 - ab_t / ab_prev
    c_x0 = np.sqrt(ab_prev) * beta / (1 - ab_t)
    c_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    var = beta * (1 - ab_prev) / (1 - ab_t) if variance == "beta_tilde" else beta
    sigma = np.where(ab_prev >= 1.0, 0.0, np.sqrt(var))
    return _table(ab_t, c_x0, np.zeros_like(ab_t), c_xt, sigma)


def ddim_table(schedule: Schedule, eta: float = 0.0) -> np.ndarray:
    """DDIM (Song et al. eq. 12): x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps_hat + s z with
    s = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev) and eps_hat = (x_t - sqrt(ab_t) x0_hat) /
    sqrt(1 - ab_t) expanded, so the row is linear in (x0_hat, x_t). eta = 1 is DDPM with beta_tilde."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ab_t, ab_prev = _levels(schedule)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    dir_coef = np.sqrt(np.clip(1 - ab_prev - sigma ** 2, 0.0, None))  # weight of eps_hat
    c_xt = dir_coef / np.sqrt(1 - ab_t)
    c_x0 = np.sqrt(ab_prev) - c_xt * np.sqrt(ab_t)
    return _table(ab_t, c_x0, np.zeros_like(ab_t), c_xt, sigma)


def dpmpp_2m_table(schedule: Schedule) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), the multistep 2nd-order solver of the probability-flow ODE in
    data prediction. With lambda = log(alpha/sigma), h = lambda_next - lambda_t, r = h_prev / h:
        x_next = (sigma_next/sigma_t) x_t - alpha_next (e^{-h} - 1) [(1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev]
    The first step is first order (no history) and the last step (to clean data) returns x0_hat."""
    ab_t, ab_prev = _levels(schedule)
    final = ab_prev >= 1.0
    alpha_t, sig_t = np.sqrt(ab_t), np.sqrt(1 - ab_t)
    alpha_n, sig_n = np.sqrt(ab_prev), np.sqrt(np.where(final, 1.0, 1 - ab_prev))  # dummy 1 where final
    lam_t = np.log(alpha_t / sig_t)
    h = np.log(alpha_n / sig_n) - lam_t
    h_prev = np.concatenate([[np.nan], h[:-1]])
    first_order = -alpha_n * np.expm1(-h)  # -alpha_next (e^{-h} - 1)
    half_inv_r = np.where(np.isnan(h_prev), 0.0, 0.5 * h / np.where(np.isnan(h_prev), 1.0, h_prev))
    c_x0 = np.where(final, 1.0, first_order * (1 + half_inv_r))
    c_x0_prev = np.where(final, 0.0, -first_order * half_inv_r)
    c_xt = np.where(final, 0.0, sig_n / sig_t)
    return _table(ab_t, c_x0, c_x0_prev, c_xt, np.zeros_like(ab_t))


def coefficient_table(schedule: Schedule, sampler: str, *, eta: float = 0.0,
                      ddpm_variance: str = "beta_tilde", device=None) -> torch.Tensor:
    """The (steps x 6) float32 table of `sampler` over `schedule`, on `device`."""
    if sampler == "ddpm":
        table = ddpm_table(schedule, ddpm_variance)
    elif sampler == "ddim":
        table = ddim_table(schedule, eta)
    elif sampler == "dpmpp":
        table = dpmpp_2m_table(schedule)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return torch.from_numpy(table).to(device=device or schedule.device, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------- the loop
def guided_outputs(model_fn, x, t, y, guidance: float, null_class):
    """(conditional output, unconditional output or None). With guidance != 1 the model runs ONCE on the
    doubled batch [(x, y), (x, null class)]; the kernel then forms u + w (c - u)."""
    if guidance == 1.0 or y is None:
        return model_fn(x, t, y), None
    null = torch.full_like(y, int(null_class))
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    return cond, uncond


def _guided_eps(model_fn, x, t, y, guidance, null_class, alpha_bar, prediction):
    cond, uncond = guided_outputs(model_fn, x, t, y, guidance, null_class)
    out = cond if uncond is None else uncond + guidance * (cond - uncond)
    return process.to_eps(out, x, alpha_bar, prediction)


def langevin_correct(model_fn, x, t, y, *, alpha_bar, alpha, snr: float, noise, guidance=1.0, null_class=None,
                     prediction="eps"):
    """One Langevin corrector step at noise level alpha_bar: x <- x + e s + sqrt(2 e) z, s = -eps_hat/sqrt(1-ab).

    Song et al. 2021 (Alg. 5, VP) set e = 2 alpha (snr |z| / |s|)^2 from per-sample (or batch-mean) norms. We
    use their typical values |z|^2 = D and |s|^2 = |eps_hat|^2 / (1 - ab) = D / (1 - ab) (a trained model's
    eps_hat has norm ~sqrt(D)), giving e = 2 alpha snr^2 (1 - ab): Song's step on images, but it never blows
    up where the score vanishes (low dimension, a sample at a mode), keeps a sample independent of its batch,
    and needs no norms.
    """
    ab = alpha_bar.expand(x.shape[0])
    score = process.score_from_eps(_guided_eps(model_fn, x, t, y, guidance, null_class, ab, prediction), ab)
    step = 2 * alpha * snr ** 2 * (1 - alpha_bar)
    return x + step * score + (2 * step).sqrt() * noise


@dataclass
class SamplingPlan:
    """Everything the step loop reads, on the device, built before the loop (rows in sampling order)."""

    table: torch.Tensor  # (S, 6) float32 coefficients
    t_model: torch.Tensor  # (S,) int64 training timesteps
    alpha_bar: torch.Tensor  # (S,) float32, for the corrector
    alpha: torch.Tensor  # (S,) float32, for the corrector's step size
    sample_ids: torch.Tensor  # (N,) int64
    y: torch.Tensor | None

    @property
    def num_steps(self) -> int:
        return int(self.table.shape[0])


def make_plan(schedule: Schedule, num: int, *, sampler: str, steps: int | None, eta: float = 0.0,
              ddpm_variance: str = "beta_tilde", spacing: str | None = None, sample_ids=None, y=None,
              device=None) -> SamplingPlan:
    """Respace `schedule` and build the coefficient table and index tensors of a sampling run on `device`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    device = torch.device(device) if device is not None else schedule.device
    spacing = spacing or DEFAULT_SPACING[sampler]
    chain = schedule.respace(steps, spacing) if steps is not None and steps != schedule.num_steps else schedule
    chain = chain.to(device)
    sample_ids = (torch.arange(num, device=device) if sample_ids is None
                  else torch.as_tensor(sample_ids, device=device, dtype=torch.int64))
    if sample_ids.shape != (num,):
        raise ValueError(f"sample_ids must have shape ({num},), got {tuple(sample_ids.shape)}")
    if y is not None:
        y = torch.as_tensor(y, device=device, dtype=torch.int64)
        if y.shape != (num,):
            raise ValueError(f"y must have shape ({num},), got {tuple(y.shape)}")
    return SamplingPlan(table=coefficient_table(chain, sampler, eta=eta, ddpm_variance=ddpm_variance,
                                                device=device),
                        t_model=chain.timesteps.flip(0).to(device), alpha_bar=chain.alphas_cumprod.flip(0),
                        alpha=chain.alphas.flip(0), sample_ids=sample_ids, y=y)


@torch.no_grad()
def sample(model_fn, shape, schedule: Schedule, *, sampler: str = "ddim", steps: int | None = None,
           eta: float = 0.0, ddpm_variance: str = "beta_tilde", prediction: str = "eps", guidance: float = 1.0,
           y=None, null_class=None, clip_x0: bool = True, seed: int = 0, sample_ids=None,
           corrector_steps: int = 0, corrector_snr: float = 0.1, progress: bool = False, device=None,
           spacing: str | None = None, backend=None) -> torch.Tensor:
    """Draw x_0 samples of `shape` = (N, *item_shape) with `model_fn(x, t, y) -> model output`.

    `steps` respaces `schedule` (None = all its steps) with `spacing` (one of SPACINGS, see `Schedule.respace`;
    default: the sampler's DEFAULT_SPACING); `sample_ids` (N,) are the global ids
    that seed each sample's noise (default 0..N-1); `corrector_steps` Langevin steps follow every predictor
    step but the last; `guidance` w != 1 needs `y` and `null_class`.
    """
    import kernels  # lazily: importing triton (and so kernels) must wait until TRITON_INTERPRET is decided

    process.check_prediction(prediction)
    if corrector_steps < 0 or corrector_snr <= 0:
        raise ValueError("corrector_steps must be >= 0 and corrector_snr > 0")
    if guidance != 1.0 and (y is None or null_class is None):
        raise ValueError("classifier-free guidance (guidance != 1) needs class labels y and null_class")
    plan = make_plan(schedule, int(shape[0]), sampler=sampler, steps=steps, eta=eta, ddpm_variance=ddpm_variance,
                     spacing=spacing, sample_ids=sample_ids, y=y, device=device)
    x_T = kernels.noise.randn(seed, 0, plan.sample_ids, tuple(shape[1:]))
    return denoise(model_fn, x_T, plan, prediction=prediction, guidance=guidance, null_class=null_class,
                   clip_x0=clip_x0, seed=seed, corrector_steps=corrector_steps, corrector_snr=corrector_snr,
                   progress=progress, backend=backend)


@torch.no_grad()
def denoise(model_fn, x: torch.Tensor, plan: SamplingPlan, *, prediction: str = "eps", guidance: float = 1.0,
            null_class=None, clip_x0: bool = True, seed: int = 0, corrector_steps: int = 0,
            corrector_snr: float = 0.1, progress: bool = False, backend=None) -> torch.Tensor:
    """The step loop from x = x_T: device-only work (no .item(), no host-built tensors), CUDA-graph ready."""
    import kernels

    num, item_shape, num_steps = x.shape[0], tuple(x.shape[1:]), plan.num_steps
    x0_prev = None
    for k in _progress(range(num_steps), progress):
        t = plan.t_model[k].expand(num)
        cond, uncond = guided_outputs(model_fn, x, t, plan.y, guidance, null_class)
        x, x0_prev = kernels.sampler_update(
            x, cond, plan.table[k], prediction=prediction, model_out_uncond=uncond, guidance=guidance,
            clip_x0=clip_x0, x0_prev=x0_prev, seed=seed, sample_ids=plan.sample_ids, stream=k + 1,
            backend=backend)
        for j in range(corrector_steps if k < num_steps - 1 else 0):
            stream = num_steps + 1 + k * corrector_steps + j  # after all predictor streams
            noise = kernels.noise.randn(seed, stream, plan.sample_ids, item_shape)
            x = langevin_correct(model_fn, x, plan.t_model[k + 1].expand(num), plan.y,
                                 alpha_bar=plan.alpha_bar[k + 1], alpha=plan.alpha[k + 1], snr=corrector_snr,
                                 noise=noise, guidance=guidance, null_class=null_class, prediction=prediction)
    return x


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc="sampling", leave=False)

