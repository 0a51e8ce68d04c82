"""Probability-flow ODE likelihood: with the exact eps of a known distribution, the ODE's log-density must be
the analytic log-density of the noised data q_{t0} (the ODE transports q_{t0} to ~N(0, I) exactly)."""
import math

import pytest
import torch

from oracles import GaussianMixture, eps_gaussian
from pipeline.diffusion import make_schedule
from pipeline.diffusion.likelihood import bits_per_dim, ode_nll

SCHEDULE = make_schedule("linear", 1000)
GAUSSIAN = GaussianMixture([1.0], [[0.5, -0.2, 0.1]], [[0.3, 0.6, 1.0]], (3,))
MIXTURE = GaussianMixture([0.4, 0.6], [[-0.7, 0.4], [0.6, -0.3]], [[0.2, 0.3], [0.3, 0.15]], (2,))


def exact_eps(dist):
    def model_fn(x, t, y):
        return dist.eps(x, SCHEDULE.alpha_bar_at(t))

    return model_fn


def analytic_nll(dist, x, t_start=0.0):
    ab = SCHEDULE.alpha_bar_at(torch.full((x.shape[0],), t_start, dtype=torch.float64))
    return -dist.log_prob_t(x, ab)


@pytest.mark.parametrize("dist", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_ode_nll_with_exact_trace_matches_the_analytic_density(dist):
    x = dist.sample(64, seed=0)
    result = ode_nll(exact_eps(dist), x, SCHEDULE, trace="exact", steps=60)
    # per sample up to ~5e-3 nats/dim: the prior N(0, I) is not exactly q_T (its mean is sqrt(ab_T) mu ~ 3e-3)
    error = result["nats"] - analytic_nll(dist, x)
    assert error.abs().max() < 5e-3 * x.shape[1] and abs(float(error.mean())) < 2e-3, error
    # and the ODE carried the data to the prior: x_T is ~N(0, I)
    assert abs(float(result["x_T"].mean())) < 0.3 and abs(float(result["x_T"].std()) - 1) < 0.25


def test_ode_nll_from_a_later_start_time():
    x = MIXTURE.sample(32, seed=1)
    result = ode_nll(exact_eps(MIXTURE), x, SCHEDULE, trace="exact", steps=60, t_start=100.0)
    torch.testing.assert_close(result["nats"], analytic_nll(MIXTURE, x, 100.0), atol=4e-3, rtol=0)


def test_hutchinson_estimate_is_unbiased():
    x = GAUSSIAN.sample(400, seed=2)
    result = ode_nll(exact_eps(GAUSSIAN), x, SCHEDULE, trace="hutchinson", num_probes=1, steps=40, seed=3)
    error = result["nats"] - analytic_nll(GAUSSIAN, x)
    assert error.std() > 1e-3  # a genuinely stochastic estimate ...
    assert abs(float(error.mean())) < 4 * float(error.std()) / math.sqrt(len(error)) + 5e-3  # ... centred on the truth


def test_scipy_solver_agrees_with_rk4():
    x = MIXTURE.sample(6, seed=4)
    rk4 = ode_nll(exact_eps(MIXTURE), x, SCHEDULE, trace="exact", steps=60)
    adaptive = ode_nll(exact_eps(MIXTURE), x, SCHEDULE, trace="exact", method="scipy", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adaptive["nats"], rk4["nats"], atol=2e-3, rtol=0)


def test_ode_nll_runs_in_float32_with_a_network_like_model():
    """float32 data and a model that takes float t (the UNet's case): finite, close to the float64 answer."""
    mean, std = torch.tensor([0.5, -0.2, 0.1]), torch.tensor([0.3, 0.6, 1.0])
    model = lambda x, t, y: eps_gaussian(x, SCHEDULE.alpha_bar_at(t).float(), mean, std)  # noqa: E731
    x = GAUSSIAN.sample(16, seed=5)
    result = ode_nll(model, x.float(), SCHEDULE, trace="exact", steps=40)
    torch.testing.assert_close(result["nats"].double(), analytic_nll(GAUSSIAN, x), atol=2e-2, rtol=0)


def test_bits_per_dim_conversion():
    nats = torch.tensor([100.0 * math.log(2)])
    assert bits_per_dim(nats, 100).item() == pytest.approx(1.0)
    # density of [-1, 1] data -> probability of 8-bit bins of width 2/255: add log2(127.5) bits per dim
    assert bits_per_dim(nats, 100, num_bins=256).item() == pytest.approx(1.0 + math.log2(127.5))


def test_bad_arguments():
    x = MIXTURE.sample(2, seed=0)
    with pytest.raises(ValueError, match="trace"):
        ode_nll(exact_eps(MIXTURE), x, SCHEDULE, trace="skilling")
    with pytest.raises(ValueError, match="continuous time"):
        ode_nll(exact_eps(MIXTURE), x, SCHEDULE.respace(10))
