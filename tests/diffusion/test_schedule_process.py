"""Schedules and the forward process: closed forms against direct computation and Bayes' rule."""
import math

import numpy as np
import pytest
import torch

from oracles import linear_alpha_bar
from pipeline.diffusion import make_schedule, process
from pipeline.diffusion.schedule import SCHEDULES, from_betas


def test_linear_schedule_is_ddpm_and_alpha_bar_is_the_product():
    s = make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.double().numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod64.numpy(), linear_alpha_bar(), rtol=1e-13)
    # alpha_bar_t = prod_{s <= t} (1 - beta_s), multiplied out step by step in exact rationals' stead: float64
    direct = [math.prod(1 - b for b in betas[: t + 1]) for t in (0, 1, 499, 999)]
    np.testing.assert_allclose(s.alphas_cumprod64.numpy()[[0, 1, 499, 999]], direct, rtol=1e-12)
    # the float32 tables are the correctly rounded float64 values, not float32 running products
    assert torch.equal(s.alphas_cumprod, torch.from_numpy(linear_alpha_bar()).float())
    assert torch.equal(s.sqrt_one_minus_alphas_cumprod, torch.from_numpy(np.sqrt(1 - linear_alpha_bar())).float())


def test_cosine_schedule_follows_its_formula():
    s = make_schedule("cosine", 1000)
    f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    t = np.arange(1000)
    expected = f(t + 1) / f(0)  # alpha_bar(t) = f(t) / f(0) before the beta clipping, which acts only near T
    np.testing.assert_allclose(s.alphas_cumprod64.numpy()[:990], expected[:990], rtol=1e-10)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_every_schedule_is_a_valid_chain(name, timesteps):
    s = make_schedule(name, timesteps)
    ab = s.alphas_cumprod64.numpy()
    assert len(s) == timesteps and np.all(np.diff(ab) < 0) and 0 < ab[-1] < 0.01 and ab[0] > 0.98
    assert torch.all(s.posterior_variance[1:] > 0) and s.posterior_variance[0] == 0
    assert torch.all(torch.isfinite(s.posterior_log_variance_clipped))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="at least 2"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError, match="steps must be"):
        make_schedule("linear", 100).respace(0)
    with pytest.raises(ValueError, match="spacing"):
        make_schedule("linear", 100).respace(10, "cubic")


def test_respacing_keeps_the_marginals_and_chains_the_betas():
    full = make_schedule("linear", 1000)
    short = full.respace([0, 10, 500, 999])
    torch.testing.assert_close(short.alphas_cumprod64, full.alphas_cumprod64[[0, 10, 500, 999]], rtol=1e-15, atol=0)
    # the short chain's steps compose to its alpha-bars: prod alpha' = prod (1 - beta') = alpha_bar
    np.testing.assert_allclose(np.cumprod(short.alphas.double().numpy()), short.alphas_cumprod64.numpy(), rtol=1e-6)
    np.testing.assert_allclose(1 - short.betas.double().numpy()[:3], short.alphas.double().numpy()[:3], rtol=1e-6)
    assert short.timesteps.tolist() == [0, 10, 500, 999]
    assert full.respace(4).timesteps.tolist() == [0, 333, 666, 999]
    # respacing the full chain with all steps changes nothing
    torch.testing.assert_close(full.respace(1000).posterior_mean_coef1, full.posterior_mean_coef1)


def test_logsnr_spacing_is_even_in_log_snr():
    s = make_schedule("linear", 1000)
    chain = s.respace(20, "logsnr")
    log_snr = np.log(chain.alphas_cumprod64.numpy() / (1 - chain.alphas_cumprod64.numpy()))
    gaps = -np.diff(log_snr)[3:]  # the first steps are limited by the integer grid, where log-SNR is steep
    assert chain.timesteps[0] == 0 and chain.timesteps[-1] == 999 and gaps.max() < 1.1 * gaps.min()
    linear_gaps = -np.diff(np.log(s.respace(20).alphas_cumprod64.numpy() / (1 - s.respace(20).alphas_cumprod64.numpy())))
    assert linear_gaps.max() > 3 * linear_gaps.min()  # what log-SNR spacing avoids


def test_continuous_time_round_trip():
    s = make_schedule("linear", 1000)
    t = torch.tensor([0.0, 3.0, 3.25, 500.5, 998.9], dtype=torch.float64)
    ab = s.alpha_bar_at(t)
    assert ab[1] == s.alphas_cumprod64[3]  # integer t is the table value
    assert s.alphas_cumprod64[4] < ab[2] < s.alphas_cumprod64[3]
    log_sigma = 0.5 * (torch.log1p(-ab) - torch.log(ab))
    torch.testing.assert_close(s.t_from_log_sigma(log_sigma), t, rtol=0, atol=1e-9)


def test_from_betas_and_device_copy():
    s = from_betas([0.1, 0.2, 0.3])
    np.testing.assert_allclose(s.alphas_cumprod64.numpy(), [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], rtol=1e-15)
    assert s.to("cpu").betas.device.type == "cpu"


# ---------------------------------------------------------------------------------------- process
def test_posterior_is_bayes_rule_on_gaussians():
    """q(x_{t-1} | x_t, x_0) proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): multiply the two Gaussians."""
    s = make_schedule("linear", 1000)
    t = torch.tensor([1, 10, 400, 999])
    x0, xt = torch.tensor([0.3, -0.7, 0.9, 0.1]), torch.tensor([0.5, 0.2, -1.1, 1.7])
    ab = linear_alpha_bar()
    for i, step in enumerate(t.tolist()):
        ab_prev, alpha = ab[step - 1], ab[step] / ab[step - 1]
        beta = 1 - alpha
        # prior q(x_{t-1} | x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood q(x_t | x_{t-1}) = N(sqrt(alpha) x, beta)
        precision = 1 / (1 - ab_prev) + alpha / beta
        mean = (math.sqrt(ab_prev) * x0[i].item() / (1 - ab_prev) + math.sqrt(alpha) * xt[i].item() / beta) / precision
        got_mean, got_var, _ = process.posterior_mean_variance(x0[i: i + 1], xt[i: i + 1], t[i: i + 1], s)
        assert got_mean.item() == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert got_var.item() == pytest.approx(1 / precision, rel=1e-5)


def test_q_sample_moments_and_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9999, 0.7, 0.5, 0.1, 1e-4], dtype=torch.float64)
    xt = process.q_sample(x0, ab, eps)
    a = ab.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    v = process.v_from_eps_x0(eps, x0, ab)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)  # Salimans & Ho's definition
    for prediction, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(process.to_x0(out, xt, ab, prediction), x0)
        torch.testing.assert_close(process.to_eps(out, xt, ab, prediction), eps)
        torch.testing.assert_close(process.target_for(prediction, x0, eps, ab), out)
    with pytest.raises(ValueError, match="prediction"):
        process.to_x0(eps, xt, ab, "score")


def test_score_from_eps_is_the_gradient_of_log_q():
    """For Gaussian data the marginal is Gaussian: its exact score equals -eps*/sqrt(1 - ab)."""
    mean, std, ab = 0.4, 0.3, torch.tensor([0.6], dtype=torch.float64)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1).requires_grad_(True)
    abx = ab.expand(9)
    var = ab * std ** 2 + 1 - ab
    log_q = -0.5 * (x - ab.sqrt() * mean) ** 2 / var
    score = torch.autograd.grad(log_q.sum(), x)[0]
    eps_star = (1 - ab).sqrt() * (x - ab.sqrt() * mean) / var  # E[eps | x_t] by Gaussian conditioning
    torch.testing.assert_close(process.score_from_eps(eps_star.detach(), abx), score)
    torch.testing.assert_close(process.eps_from_score(score, abx), eps_star.detach())
