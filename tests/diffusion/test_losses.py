"""Losses: KL against Monte Carlo, the discretised decoder, min-SNR weights, the fused training loss, the
variational bound with an oracle model, and importance sampling of timesteps."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import kernels
from pipeline.diffusion import losses, make_schedule, process
from pipeline.diffusion.likelihood import vlb_nll

SCHEDULE = make_schedule("linear", 1000)


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for m1, v1, m2, v2 in [(0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.04), (0.0, 3.0, 0.0, 1.0)]:
        x = m1 + math.sqrt(v1) * torch.randn(200_000, generator=g, dtype=torch.float64)
        log_ratio = stats.norm(m1, math.sqrt(v1)).logpdf(x.numpy()) - stats.norm(m2, math.sqrt(v2)).logpdf(x.numpy())
        kl = losses.normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2))))
        assert abs(kl.item() - log_ratio.mean()) < 4 * log_ratio.std() / math.sqrt(len(x)) + 1e-6


def test_discretized_gaussian_is_a_distribution_over_the_256_bins():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.97, math.log(1e-3)), (-1.5, 0.0), (0.3, math.log(5.0)),
                            (0.5, -9.0)]:
        x = grid.reshape(1, -1)
        log_p = losses.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # a middle bin is the Gaussian mass between its edges; an edge bin takes the whole tail
    x, mean, scale = torch.tensor([[2 * 100 / 255 - 1, -1.0]]), 0.1, 0.2
    log_p = losses.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    dist, half = stats.norm(mean, scale), 1 / 255
    assert log_p[0, 0].item() == pytest.approx(math.log(dist.cdf(x[0, 0] + half) - dist.cdf(x[0, 0] - half)), rel=1e-4)
    assert log_p[0, 1].item() == pytest.approx(math.log(dist.cdf(-1 + half)), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_give_min_snr_times_the_x0_error(prediction):
    g = torch.Generator().manual_seed(1)
    ab = torch.tensor([0.999, 0.9, 0.5, 0.05, 1e-3], dtype=torch.float64)
    x0, eps = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    xt = process.q_sample(x0, ab, eps)
    out = process.target_for(prediction, x0, eps, ab) + 0.1 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    pred_error = (out - process.target_for(prediction, x0, eps, ab)).pow(2).mean(1)
    x0_error = (process.to_x0(out, xt, ab, prediction) - x0).pow(2).mean(1)
    snr = ab / (1 - ab)
    weights = losses.min_snr_weights(ab, prediction, gamma=5.0)
    torch.testing.assert_close(weights * pred_error, torch.clamp(snr, max=5.0) * x0_error)


class LinearModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.time = torch.nn.Parameter(torch.tensor(0.001))

    def forward(self, x, t, y=None):
        return self.conv(x) + self.time * t.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("v", "min_snr"), ("x0", "min_snr")])
def test_training_losses_is_the_simple_loss_with_counter_noise(prediction, weighting):
    torch.manual_seed(0)
    model = LinearModel()
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 100, 249, 250, 700, 999])
    ids = torch.arange(10, 16)
    out = losses.training_losses(model, x0, t, SCHEDULE, seed=3, sample_ids=ids, stream=1_000_005,
                                 prediction=prediction, weighting=weighting, backend="torch")
    # the same loss written out from the contract: noise(seed, stream, sample_id, j), then plain MSE
    ab = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()[t]
    eps = kernels.noise.randn(3, 1_000_005, ids, (2, 4, 4))
    xt = ab.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().reshape(-1, 1, 1, 1) * eps
    target = {"eps": eps, "x0": x0, "v": ab.sqrt().reshape(-1, 1, 1, 1) * eps - (1 - ab).sqrt().reshape(-1, 1, 1, 1) * x0}
    per_sample = (model(xt, t) - target[prediction]).pow(2).mean((1, 2, 3))
    snr = ab / (1 - ab)
    w = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}[prediction]
    expected = (per_sample * (w if weighting == "min_snr" else 1)).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_sample, per_sample.detach(), rtol=1e-5, atol=1e-6)
    assert out.bucket_counts.tolist() == [3, 1, 1, 1]  # quartiles of t: [0, 100, 249 | 250 | 700 | 999]
    out.loss.backward()
    assert model.conv.weight.grad.abs().sum() > 0


def test_training_losses_rejects_bad_arguments():
    x0 = torch.zeros(2, 2, 4, 4)
    kwargs = dict(seed=0, sample_ids=torch.arange(2), stream=0)
    with pytest.raises(ValueError, match="weighting"):
        losses.training_losses(LinearModel(), x0, torch.zeros(2, dtype=torch.int64), SCHEDULE, weighting="p2", **kwargs)
    with pytest.raises(ValueError, match="t must have shape"):
        losses.training_losses(LinearModel(), x0, torch.zeros(3, dtype=torch.int64), SCHEDULE, **kwargs)


# ---------------------------------------------------------------------------------- variational bound
def grid_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 2, 2), generator=g).double() * 2 / 255 - 1


def test_vlb_with_an_oracle_model_is_prior_plus_decoder():
    """A model that knows x0 predicts eps exactly: every KL term vanishes, L_0 is the decoder's bin mass."""
    x0 = grid_data(8, 0)
    chain = SCHEDULE.respace(50)

    def oracle(x, t, y):
        ab = SCHEDULE.alphas_cumprod64[t].reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    result = vlb_nll(oracle, x0, chain)
    assert result["terms_bpd"][:, 1:].abs().max() < 1e-6
    sigma = math.exp(0.5 * chain.posterior_log_variance_clipped[0].item())
    dist, half = stats.norm(0, sigma), 1 / 255
    expected = [-sum(math.log(dist.cdf(half) - dist.cdf(-half)) if abs(v) < 1 else math.log(dist.cdf(half))
                     for v in row.flatten().tolist()) for row in x0]
    np.testing.assert_allclose(result["terms_bpd"][:, 0].numpy() * 4 * math.log(2), expected, rtol=1e-4)
    ab_T = chain.alphas_cumprod64[-1].item()
    prior = [sum(0.5 * (ab_T * v * v + (1 - ab_T) - 1 - math.log(1 - ab_T)) for v in row.flatten().tolist())
             for row in x0]
    np.testing.assert_allclose(result["prior_bpd"].numpy() * 4 * math.log(2), prior, rtol=1e-5)
    # a model that knows nothing (predicts x0 = 0) pays in the KL terms
    blind = vlb_nll(lambda x, t, y: torch.zeros_like(x), x0, chain, prediction="x0")
    assert (blind["bpd"] > result["bpd"] + 0.1).all()


# ----------------------------------------------------------------------------------- timestep sampling
def test_uniform_timesteps_cover_the_range():
    t = losses.sample_timesteps(20_000, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert t.dtype == torch.int64 and counts.min() > 1800 and counts.max() < 2200


def test_loss_aware_sampler_is_uniform_until_warm_then_unbiased():
    sampler = losses.LossAwareSampler(4, history=2)
    np.testing.assert_allclose(sampler.probabilities(), 0.25)
    true_loss = np.array([4.0, 1.0, 1.0, 0.25])
    for _ in range(2):
        sampler.update(torch.arange(4), torch.from_numpy(true_loss))
    p = sampler.probabilities()
    np.testing.assert_allclose(p, 0.999 * true_loss / true_loss.sum() + 0.001 / 4)  # sqrt(E[L^2]) = L here
    t, w = sampler.sample(10_000, generator=torch.Generator().manual_seed(0))
    # E_p[w L_t] equals the uniform mean of L_t; the sample estimate is close to it
    assert float((w.double() * torch.from_numpy(true_loss)[t]).mean()) == pytest.approx(true_loss.mean(), rel=0.05)
    assert np.sum(p * (1 / (4 * p)) * true_loss) == pytest.approx(true_loss.mean())
    restored = losses.LossAwareSampler(4, history=2)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.probabilities(), p)
