"""A convolutional VAE: encoder -> (mu, log sigma^2) of q(z | x), reparameterised z, decoder -> p(x | z).

The latent is spatial: `latent_channels` x (image_size / 2^(len(channel_mult) - 1))^2, prior N(0, I), so a
latent DDPM can run on it unchanged. The negative ELBO per sample (nats) is

    -ELBO(x) = E_q[-log p(x | z)] + KL(q(z | x) || N(0, I))       (one reparameterised z; KL in closed form)

and the training loss weights the KL by beta (beta-VAE). Data x lies in [-1, 1]. Likelihoods:
- "gaussian": N(x; mean, s^2) with a learned per-channel scale s (a continuous density; its bits/dim are
  converted to 8-bit bins of width 2/255, see `pipeline.diffusion.likelihood.bits_per_dim`);
- "discretized": the 256-bin discretised Gaussian of DDPM's decoder with a per-pixel scale (exact discrete
  bits for 8-bit images);
- "bernoulli": pixels (x + 1)/2 as Bernoulli probabilities (exact for binarised data).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.likelihood import bits_per_dim
from pipeline.diffusion.losses import discretized_gaussian_log_likelihood, sum_except_batch
from pipeline.models.unet import ResBlock, norm

LIKELIHOODS = ("gaussian", "bernoulli", "discretized")
LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in fp32


def gaussian_kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) per sample, summed over latent dims: 0.5 sum(mu^2 + s^2 - 1 - log s^2)."""
    return 0.5 * sum_except_batch(mu ** 2 + logvar.exp() - 1.0 - logvar)


class VAE(nn.Module):
    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 latent_channels: int = 4, image_size: int = 8, likelihood: str = "discretized"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"VAE likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if min(in_channels, base_channels, latent_channels) < 1 or len(channel_mult) < 1:
            raise ValueError("VAE: in_channels, base_channels, latent_channels >= 1 and a non-empty channel_mult")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"VAE: image_size {image_size} is not divisible by 2^{len(channel_mult) - 1}")
        self.in_channels, self.latent_channels, self.image_size = in_channels, latent_channels, image_size
        self.likelihood = likelihood
        self.latent_size = image_size // 2 ** (len(channel_mult) - 1)
        widths = [base_channels * m for m in channel_mult]
        self.encoder = _encoder(in_channels, widths, 2 * latent_channels)
        out_ch = 2 * in_channels if likelihood == "discretized" else in_channels
        self.decoder = _decoder(latent_channels, widths, out_ch)
        # per-channel log scale of the Gaussian likelihood (start at 0.2: a loose fit that does not collapse q)
        self.log_scale = nn.Parameter(torch.full((in_channels,), math.log(0.2))) if likelihood == "gaussian" else None

    # ---------------------------------------------------------------------------------------- the model
    def encode(self, x: torch.Tensor):
        """(mu, logvar) of q(z | x), each (B, latent_channels, latent_size, latent_size)."""
        self._check_input(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters: mean (gaussian), logits (bernoulli) or [mean, log_scale] (discretized)."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu, logvar, generator: torch.Generator | None = None):
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + (0.5 * logvar).exp() * noise

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(recon_params, mu, logvar) with one reparameterised z."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar

    # ------------------------------------------------------------------------------------ the bound
    def reconstruction_nll(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) per sample, nats."""
        if self.likelihood == "bernoulli":
            return sum_except_batch(F.binary_cross_entropy_with_logits(params, (x + 1) / 2, reduction="none"))
        if self.likelihood == "discretized":
            mean, log_scale = params.chunk(2, dim=1)
            return -sum_except_batch(discretized_gaussian_log_likelihood(x, mean, log_scale.clamp(min=-7.0)))
        log_s = self.log_scale.reshape(1, -1, 1, 1)
        nll = 0.5 * ((x - params) * torch.exp(-log_s)) ** 2 + log_s + 0.5 * math.log(2 * math.pi)
        return sum_except_batch(nll)

    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Per-sample negative-ELBO terms in nats: {"recon", "kl", "nelbo"} (each (B,))."""
        params, mu, logvar = self(x, generator)
        # the bound in fp32 whatever the training precision (bf16 has no log_ndtr, and sums of many terms)
        x, params, mu, logvar = x.float(), params.float(), mu.float(), logvar.float()
        recon, kl = self.reconstruction_nll(x, params), gaussian_kl_standard_normal(mu, logvar)
        return {"recon": recon, "kl": kl, "nelbo": recon + kl}

    def compile_units(self) -> list[nn.Module]:
        """What `train.compile` compiles: the loss runs the encoder and decoder, not `forward`."""
        return [self.encoder, self.decoder]

    def loss(self, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None):
        """(loss, metrics): loss = mean over the batch of (recon + beta KL) per data dimension (nats/dim, so the
        learning rate does not depend on the image size); metrics (detached) hold recon and kl in nats/dim and
        elbo_bits_per_dim, the beta = 1 bound in bits/dim."""
        terms = self.elbo(x, generator)
        dims = x[0].numel()
        loss = (terms["recon"] + beta * terms["kl"]).mean() / dims
        num_bins = 256 if self.likelihood == "gaussian" else None
        metrics = {"recon": terms["recon"].detach().mean() / dims, "kl": terms["kl"].detach().mean() / dims,
                   "elbo_bits_per_dim": bits_per_dim(terms["nelbo"].detach(), dims, num_bins).mean()}
        return loss, metrics

    # --------------------------------------------------------------------------------------- sampling
    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean in [-1, 1]."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params) * 2 - 1
        mean = params.chunk(2, dim=1)[0] if self.likelihood == "discretized" else params
        return mean.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(0, I) to the mean image, (n, C, H, W) in [-1, 1]."""
        device = next(self.parameters()).device
        z = torch.randn((n, self.latent_channels, self.latent_size, self.latent_size), generator=generator,
                        device=device)
        return self.mean_image(self.decode(z))

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"VAE expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


def _encoder(in_ch: int, widths: list[int], out_ch: int) -> nn.Sequential:
    layers, ch = [nn.Conv2d(in_ch, widths[0], 3, padding=1)], widths[0]
    for i, width in enumerate(widths):
        layers.append(ResBlock(ch, width, None))
        ch = width
        if i < len(widths) - 1:
            layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
    layers += [norm(ch, silu=True), nn.Identity(), nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


def _decoder(latent_ch: int, widths: list[int], out_ch: int) -> nn.Sequential:
    layers, ch = [nn.Conv2d(latent_ch, widths[-1], 3, padding=1)], widths[-1]
    for i in reversed(range(len(widths))):
        layers.append(ResBlock(ch, widths[i], None))
        ch = widths[i]
        if i > 0:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
    layers += [norm(ch, silu=True), nn.Identity(), nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)
