"""The forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0) and the prediction conversions.

With a = alpha_bar_t:  x_t = sqrt(a) x_0 + sqrt(1 - a) eps,  v = sqrt(a) eps - sqrt(1 - a) x_0  (Salimans & Ho),
score = grad log q(x_t) = -eps / sqrt(1 - a).  Every function takes per-sample (B,) tensors and broadcasts them
over the remaining dimensions of x. These are the plain-torch references; training and sampling run the same
math through the fused `kernels` ops.
"""
from __future__ import annotations

import torch

from pipeline.conventions import PREDICTIONS

from .schedule import Schedule


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x, in x's dtype."""
    return values.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def gather(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast against x."""
    return expand_like(table.to(x.device)[t.to(x.device)], x)


def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x_0 + sqrt(1 - a) eps."""
    a = expand_like(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_mean_variance(x0: torch.Tensor, alpha_bar: torch.Tensor):
    """Mean and variance of q(x_t | x_0)."""
    a = expand_like(alpha_bar, x0)
    return a.sqrt() * x0, (1 - a).expand_as(x0)


def posterior_mean_variance(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) at steps t of `schedule`."""
    mean = gather(schedule.posterior_mean_coef1, t, xt) * x0 + gather(schedule.posterior_mean_coef2, t, xt) * xt
    var = gather(schedule.posterior_variance, t, xt).expand_as(xt)
    logvar = gather(schedule.posterior_log_variance_clipped, t, xt).expand_as(xt)
    return mean, var, logvar


def x0_from_eps(xt, eps, alpha_bar):
    a = expand_like(alpha_bar, xt)
    return (xt - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(xt, x0, alpha_bar):
    a = expand_like(alpha_bar, xt)
    return (xt - a.sqrt() * x0) / (1 - a).sqrt()


def v_from_eps_x0(eps, x0, alpha_bar):
    a = expand_like(alpha_bar, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def x0_from_v(xt, v, alpha_bar):
    a = expand_like(alpha_bar, xt)
    return a.sqrt() * xt - (1 - a).sqrt() * v


def eps_from_v(xt, v, alpha_bar):
    a = expand_like(alpha_bar, xt)
    return (1 - a).sqrt() * xt + a.sqrt() * v


def score_from_eps(eps, alpha_bar):
    """grad_x log q_t(x) = -eps / sqrt(1 - a) (Tweedie / denoising score matching)."""
    return -eps / expand_like(1 - alpha_bar, eps).sqrt()


def eps_from_score(score, alpha_bar):
    return -score * expand_like(1 - alpha_bar, score).sqrt()


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def to_x0(model_out, xt, alpha_bar, prediction: str):
    """x0-hat from the model output read as `prediction`."""
    check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(xt, model_out, alpha_bar)
    if prediction == "v":
        return x0_from_v(xt, model_out, alpha_bar)
    return model_out


def to_eps(model_out, xt, alpha_bar, prediction: str):
    """eps-hat from the model output read as `prediction`."""
    check_prediction(prediction)
    if prediction == "x0":
        return eps_from_x0(xt, model_out, alpha_bar)
    if prediction == "v":
        return eps_from_v(xt, model_out, alpha_bar)
    return model_out


def target_for(prediction: str, x0, eps, alpha_bar):
    """The regression target of the named prediction for a given (x0, eps) pair."""
    check_prediction(prediction)
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_eps_x0(eps, x0, alpha_bar)
    return eps
