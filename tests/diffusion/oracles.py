"""Data distributions whose exact eps-predictor is known in closed form, and the samplers' textbook steps.

For data x0 ~ sum_k w_k N(m_k, diag s_k^2), the noised marginal is q_t = sum_k w_k N(sqrt(ab) m_k,
diag(ab s_k^2 + 1 - ab)), so the exact eps-prediction is eps*(x_t) = -sqrt(1 - ab) grad log q_t(x_t).
Everything is written here from the papers' formulas, independently of pipeline.diffusion.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def linear_alpha_bar(timesteps: int = 1000) -> np.ndarray:
    """DDPM's schedule written out: beta from 1e-4 to 0.02, alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, timesteps))


class GaussianMixture:
    """Mixture over flat dims; samples/evaluation in (N, *shape) layout."""

    def __init__(self, weights, means, stds, shape):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.m = torch.tensor(means, dtype=torch.float64)  # (K, D)
        self.s = torch.tensor(stds, dtype=torch.float64)  # (K, D)
        self.shape = tuple(shape)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        x = self.m[k] + self.s[k] * torch.randn(n, self.m.shape[1], generator=g, dtype=torch.float64)
        return x.reshape(n, *self.shape)

    def log_prob_t(self, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """log q_t(x) (float64); ab (N,) per sample."""
        flat = x.reshape(x.shape[0], -1).double()
        a = ab.double().reshape(-1, 1, 1)
        var = a * self.s ** 2 + 1 - a  # (N, K, D)
        diff = flat[:, None, :] - a.sqrt() * self.m
        comp = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.logsumexp(comp + torch.log(self.w), dim=1)

    def eps(self, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """Exact eps-prediction -sqrt(1 - ab) grad log q_t, in x's dtype."""
        with torch.enable_grad():
            xx = x.double() if x.requires_grad else x.detach().double().requires_grad_(True)
            grad = torch.autograd.grad(self.log_prob_t(xx, ab).sum(), xx, create_graph=x.requires_grad)[0]
        out = -(1 - ab.double()).sqrt().reshape(-1, *([1] * (x.dim() - 1))) * grad
        return out.to(x.dtype)


def eps_gaussian(x, ab, mean, std):
    """Closed-form eps* of N(mean, std^2) data (differentiable in x, for the ODE divergence)."""
    a = ab.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std ** 2 + 1 - a)


# --- textbook sampler steps (x_next as a function of x_t, x0_hat, x0_hat_prev) --------------------------
def ddpm_step(ab_t, ab_prev, x_t, x0_hat, variance):
    """Ho et al. eq. 7: posterior mean mu_tilde(x_t, x0) and sigma^2 = beta_tilde or beta."""
    beta = 1 - ab_t / ab_prev
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0_hat + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x_t
    var = (1 - ab_prev) / (1 - ab_t) * beta if variance == "beta_tilde" else beta
    return mean, (0.0 if ab_prev == 1.0 else math.sqrt(var))


def ddim_step(ab_t, ab_prev, x_t, x0_hat, eta):
    """Song et al. eq. 12 with eps_hat re-derived from x0_hat (so that clipping stays consistent)."""
    eps = (x_t - math.sqrt(ab_t) * x0_hat) / math.sqrt(1 - ab_t)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    return math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps, sigma


def dpmpp_2m_step(ab_t, ab_prev, x_t, x0_hat, x0_hat_prev, h_prev):
    """Lu et al. 2022 (DPM-Solver++), Algorithm 2 (multistep 2M); returns (x_next, h)."""
    if ab_prev == 1.0:  # to clean data: the data prediction itself
        return x0_hat, math.inf
    alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    alpha_n, sigma_n = math.sqrt(ab_prev), math.sqrt(1 - ab_prev)
    h = math.log(alpha_n / sigma_n) - math.log(alpha_t / sigma_t)
    if h_prev is None:
        d = x0_hat
    else:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_hat_prev
    return sigma_n / sigma_t * x_t - alpha_n * (math.exp(-h) - 1) * d, h
