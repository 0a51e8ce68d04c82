"""Negative log-likelihood of data under a trained diffusion model, in nats and bits per dimension.

Two routes (both take `model_fn(x, t, y) -> model output` read as `prediction`):

1. `vlb_nll`: the variational bound L_T + sum_{t>0} L_{t-1} + L_0 of the (possibly respaced) discrete chain,
   with the discretised Gaussian decoder for L_0 (x in [-1, 1] on a 256-value grid). An upper bound on the
   discrete NLL; one model call per step of the chain.
2. `ode_nll`: the exact log-density of the probability-flow ODE (diffusion read as a continuous normalising
   flow, Song et al. 2021). In the variable u = log sigma_bar = 0.5 log((1 - ab)/ab) the ODE is
       dx/du = -(1 - ab) x + sqrt(1 - ab) eps(x, t(u))
   (d sqrt(ab)/du = -sqrt(ab)(1 - ab) and x / sqrt(ab) moves with eps d sigma_bar), which is smooth and
   O(1) over the whole range, so a fixed-step RK4 in u integrates it accurately with ~100 steps. Along the
   path d log p / du = -div(drift), so  log p_{t0}(x) = log N(x_T; 0, I) + int_{u0}^{u1} div(drift) du.
   The divergence is exact (D backward passes, for small D) or Hutchinson's estimator E[z^T J z] with fixed
   Rademacher probes per trajectory (FFJORD). Choice: RK4 with fixed steps (default, no host sync, works on
   any device) or scipy's adaptive RK45 (`method="scipy"`, float64 on the host, for reference numbers).
   Continuous t(u) interpolates the schedule's log sigma_bar linearly between integer steps
   (`Schedule.t_from_log_sigma`); the model gets that float64 t.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import losses, process
from .schedule import Schedule


def bits_per_dim(nats: torch.Tensor, num_dims: int, num_bins: int | None = None) -> torch.Tensor:
    """Bits per dimension from per-sample nats. With `num_bins` (e.g. 256) the nats are a continuous density
    of data scaled to [-1, 1] and are converted to the discrete probability of its bins of width
    2 / (num_bins - 1): bpd = nats / (D ln 2) + log2((num_bins - 1) / 2)."""
    bpd = nats / (num_dims * math.log(2.0))
    return bpd if num_bins is None else bpd + math.log2((num_bins - 1) / 2)


@torch.no_grad()
def vlb_nll(model_fn, x0: torch.Tensor, schedule: Schedule, *, prediction: str = "eps",
            variance: str = "beta_tilde", y=None, clip_x0: bool = False, seed: int = 0) -> dict:
    """The full variational bound per sample: {"nats", "bpd", "prior_bpd", "terms_bpd" (B, S)}.

    x0 must lie on the 256-value grid in [-1, 1] (the decoder is discretised). `schedule` may be respaced:
    the bound is then that of the shorter chain (fewer model calls, looser bound).
    """
    generator = torch.Generator(device=x0.device).manual_seed(seed)
    num_dims = x0[0].numel()
    terms = []
    for i in range(schedule.num_steps):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        step = torch.full((x0.shape[0],), i, dtype=torch.int64, device=x0.device)
        terms.append(losses.vlb_term(model_fn, x0, step, schedule, noise, prediction=prediction,
                                     variance=variance, y=y, clip_x0=clip_x0))
    terms = torch.stack(terms, dim=1)
    prior = losses.prior_kl(x0, schedule)
    nats = terms.sum(dim=1) + prior
    return {"nats": nats, "bpd": bits_per_dim(nats, num_dims), "prior_bpd": bits_per_dim(prior, num_dims),
            "terms_bpd": bits_per_dim(terms, num_dims)}


class _ProbabilityFlow:
    """Drift of the PF ODE in u = log sigma_bar and its divergence, for a fixed batch and probes."""

    def __init__(self, model_fn, schedule, prediction, y, trace, probes):
        self.model_fn, self.schedule, self.prediction, self.y = model_fn, schedule, prediction, y
        self.trace, self.probes = trace, probes

    def __call__(self, x: torch.Tensor, u: float):
        batch = x.shape[0]
        u_t = torch.full((batch,), float(u), dtype=torch.float64, device=x.device)
        t = self.schedule.t_from_log_sigma(u_t)
        ab = torch.sigmoid(-2 * u_t)  # 1 / (1 + sigma_bar^2)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = self.model_fn(x, t, self.y)
            eps = process.to_eps(out, x, ab.to(x.dtype), self.prediction)
            div_eps = self._divergence(eps, x)
        a = process.expand_like(ab, x)
        drift = -(1 - a) * x + (1 - a).sqrt() * eps
        div = -(1 - ab.to(x.dtype)) * x[0].numel() + (1 - ab.to(x.dtype)).sqrt() * div_eps
        return drift.detach(), div.detach()

    def _divergence(self, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.trace == "exact":
            flat = eps.reshape(eps.shape[0], -1)
            div = torch.zeros(eps.shape[0], dtype=x.dtype, device=x.device)
            for j in range(flat.shape[1]):
                grad = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)[0]
                div = div + grad.reshape(grad.shape[0], -1)[:, j]
            return div
        total = torch.zeros(eps.shape[0], dtype=x.dtype, device=x.device)
        for k, z in enumerate(self.probes):
            grad = torch.autograd.grad(eps, x, grad_outputs=z, retain_graph=k < len(self.probes) - 1)[0]
            total = total + (grad * z).reshape(z.shape[0], -1).sum(dim=1)
        return total / len(self.probes)


def ode_nll(model_fn, x0: torch.Tensor, schedule: Schedule, *, prediction: str = "eps", y=None,
            trace: str = "hutchinson", num_probes: int = 1, method: str = "rk4", steps: int = 100,
            rtol: float = 1e-5, atol: float = 1e-5, t_start: float = 0.0, num_bins: int | None = None,
            seed: int = 0) -> dict:
    """-log p(x0) of the probability-flow ODE from training time `t_start` to the last step, per sample.

    Returns {"nats", "bpd", "x_T", "prior_nats"}; `num_bins` converts the density of [-1, 1]-scaled data to
    bits of 8-bit bins (pass dequantised data then). `schedule` must be the full training schedule.
    """
    if trace not in ("exact", "hutchinson") or method not in ("rk4", "scipy"):
        raise ValueError("trace must be 'exact' or 'hutchinson', method 'rk4' or 'scipy'")
    if steps < 1 or num_probes < 1:
        raise ValueError("steps and num_probes must be >= 1")
    process.check_prediction(prediction)
    generator = torch.Generator(device=x0.device).manual_seed(seed)
    probes = [torch.randint(0, 2, x0.shape, generator=generator, device=x0.device).to(x0.dtype) * 2 - 1
              for _ in range(num_probes)]
    flow = _ProbabilityFlow(model_fn, schedule, prediction, y, trace, probes)
    ab_start = schedule.alpha_bar_at(torch.tensor([float(t_start)], dtype=torch.float64))
    u0, u1 = _log_sigma(ab_start), _log_sigma(schedule.alphas_cumprod64[-1:].cpu())
    integrate = _rk4 if method == "rk4" else _scipy
    x_T, integral = integrate(flow, x0, u0, u1, steps=steps, rtol=rtol, atol=atol)
    num_dims = x0[0].numel()
    prior = -0.5 * (x_T.reshape(x_T.shape[0], -1) ** 2).sum(dim=1) - 0.5 * num_dims * math.log(2 * math.pi)
    nats = -(prior + integral)
    return {"nats": nats, "bpd": bits_per_dim(nats, num_dims, num_bins), "x_T": x_T, "prior_nats": -prior}


def _log_sigma(alpha_bar: torch.Tensor) -> float:
    return float(0.5 * (torch.log1p(-alpha_bar) - torch.log(alpha_bar)))


def _rk4(flow, x, u0, u1, *, steps, **_):
    h = (u1 - u0) / steps
    integral = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for n in range(steps):
        u = u0 + n * h
        k1, d1 = flow(x, u)
        k2, d2 = flow(x + 0.5 * h * k1, u + 0.5 * h)
        k3, d3 = flow(x + 0.5 * h * k2, u + 0.5 * h)
        k4, d4 = flow(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        integral = integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    return x, integral


def _scipy(flow, x, u0, u1, *, rtol, atol, **_):
    from scipy.integrate import solve_ivp

    shape, dtype, device = x.shape, x.dtype, x.device
    size = x.numel()

    def rhs(u, state):
        xs = torch.from_numpy(state[:size]).reshape(shape).to(device, dtype)
        drift, div = flow(xs, u)
        return np.concatenate([drift.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    state0 = np.concatenate([x.double().cpu().numpy().ravel(), np.zeros(shape[0])])
    sol = solve_ivp(rhs, (u0, u1), state0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solve failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1])
    return end[:size].reshape(shape).to(device, dtype), end[size:].to(device, dtype)
