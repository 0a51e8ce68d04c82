"""VAE: closed-form KL against Monte Carlo, the ELBO bounds log p(x) on a linear-Gaussian model (and is tight
with the exact posterior), every likelihood at 8x8..64x64, and that it learns real digits."""
import math

import pytest
import torch

from pipeline.models import VAE
from pipeline.models.vae import gaussian_kl_standard_normal


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn(100_000, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    log_q = -0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z ** 2 + math.log(2 * math.pi))
    samples = (log_q - log_p).sum(dim=(2, 3, 4))  # (draws, batch)
    closed = gaussian_kl_standard_normal(mu, logvar)
    assert torch.all((closed - samples.mean(0)).abs() < 4 * samples.std(0) / math.sqrt(len(samples)))


# ---------------------------------------------------------------------------------- linear-Gaussian case
C, SIZE, SIGMA = 3, 4, 0.3
W = torch.tensor([[0.8], [-0.5], [0.3]], dtype=torch.float64)  # (C, 1): one latent channel per pixel
B = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)


def linear_gaussian_vae() -> VAE:
    """A VAE whose decoder is linear (a 1x1 conv) with Gaussian noise SIGMA: p(x) is known in closed form."""
    vae = VAE(C, 8, (1,), 1, SIZE, "gaussian").double()
    decoder = torch.nn.Conv2d(1, C, 1).double()
    with torch.no_grad():
        decoder.weight.copy_(W.reshape(C, 1, 1, 1))
        decoder.bias.copy_(B)
        vae.log_scale.fill_(math.log(SIGMA))
    vae.decoder = decoder
    return vae


def true_log_likelihood(x: torch.Tensor) -> torch.Tensor:
    """log p(x) with every pixel independently N(B, W W^T + SIGMA^2 I)."""
    pixels = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, C)
    dist = torch.distributions.MultivariateNormal(B, W @ W.T + SIGMA ** 2 * torch.eye(C, dtype=torch.float64))
    return dist.log_prob(pixels).sum(dim=1)


def sample_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    noise = SIGMA * torch.randn(n, C, SIZE, SIZE, generator=g, dtype=torch.float64)
    return (W.reshape(1, C, 1, 1) * z + B.reshape(1, C, 1, 1) + noise)


def mean_elbo(vae: VAE, x: torch.Tensor, draws: int = 400):
    """Monte Carlo ELBO per sample (mean over draws of z) and its standard error."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        values = torch.stack([-vae.elbo(x, generator=g)["nelbo"] for _ in range(draws)])
    return values.mean(0), values.std(0) / math.sqrt(draws)


def test_elbo_lower_bounds_the_true_log_likelihood():
    torch.manual_seed(0)
    vae, x = linear_gaussian_vae(), sample_data(4)
    elbo, stderr = mean_elbo(vae, x)
    assert torch.all(elbo + 4 * stderr < true_log_likelihood(x))  # an arbitrary encoder: strictly below


def test_elbo_is_tight_with_the_exact_posterior():
    """With q(z | x) = p(z | x) (linear-Gaussian posterior per pixel), the ELBO equals log p(x)."""
    vae, x = linear_gaussian_vae(), sample_data(4)
    post_var = 1.0 / (1.0 + (W.T @ W).item() / SIGMA ** 2)
    encoder = torch.nn.Conv2d(C, 2, 1).double()  # channel 0: posterior mean, channel 1: log variance
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.weight[0, :, 0, 0] = post_var * W[:, 0] / SIGMA ** 2
        encoder.bias.copy_(torch.tensor([-post_var * (W[:, 0] @ B).item() / SIGMA ** 2, math.log(post_var)]))
    vae.encoder = encoder
    elbo, stderr = mean_elbo(vae, x)
    truth = true_log_likelihood(x)
    assert torch.all((elbo - truth).abs() < 4 * stderr + 1e-6), (elbo, truth, stderr)


# ------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "discretized"])
@pytest.mark.parametrize("channels,size,mult", [(1, 8, (1, 2)), (3, 32, (1, 2, 2)), (3, 64, (1, 2, 2, 2))])
def test_shapes_losses_and_samples(likelihood, channels, size, mult):
    vae = VAE(channels, 8, mult, 4, size, likelihood)
    x = torch.randint(0, 256, (2, channels, size, size)).float() * 2 / 255 - 1
    params, mu, logvar = vae(x)
    assert mu.shape == logvar.shape == (2, 4, size // 2 ** (len(mult) - 1), size // 2 ** (len(mult) - 1))
    assert params.shape == (2, channels * (2 if likelihood == "discretized" else 1), size, size)
    loss, metrics = vae.loss(x, beta=0.5)
    terms = vae.elbo(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(metrics) == {"recon", "kl", "elbo_bits_per_dim"}
    assert torch.all(terms["nelbo"] == terms["recon"] + terms["kl"]) and torch.all(terms["kl"] >= 0)
    samples = vae.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, channels, size, size) and samples.abs().max() <= 1


def test_discretized_bits_per_dim_are_the_bound_in_bits():
    vae = VAE(1, 8, (1, 2), 2, 8, "discretized")
    x = torch.randint(0, 256, (4, 1, 8, 8)).float() * 2 / 255 - 1
    g = torch.Generator().manual_seed(0)
    _, metrics = vae.loss(x, generator=g)
    nelbo = vae.elbo(x, generator=torch.Generator().manual_seed(0))["nelbo"]
    assert metrics["elbo_bits_per_dim"].item() == pytest.approx((nelbo / (64 * math.log(2))).mean().item(), rel=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="likelihood"):
        VAE(1, 8, (1,), 2, 8, "poisson")
    with pytest.raises(ValueError, match="not divisible"):
        VAE(1, 8, (1, 2, 2, 2), 2, 12, "gaussian")
    with pytest.raises(ValueError, match="expects x of shape"):
        VAE(1, 8, (1, 2), 2, 8, "gaussian").loss(torch.zeros(2, 3, 8, 8))


def test_vae_learns_digits(digits):
    torch.manual_seed(0)
    vae = VAE(1, 16, (1, 2), 2, 8, "discretized")
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    data = digits[:512]
    history = []
    for _ in range(60):
        loss, metrics = vae.loss(data[torch.randint(0, len(data), (64,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics["elbo_bits_per_dim"].item())
    assert sum(history[-10:]) / 10 < 0.85 * history[0], history  # ~5.2 -> ~4.1 bits/dim in 60 steps
