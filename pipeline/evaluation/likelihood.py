"""Likelihood of held-out real images under a trained export, in bits per dimension.

- VAE: the ELBO and the importance-weighted bound IWAE_K (Burda et al. 2016), both from the same K draws
  z_k ~ q(z | x), so IWAE_K <= ELBO per sample (Jensen), and reconstruction PSNR of the posterior mean.
- DDPM: the variational bound of the discrete chain and the probability-flow-ODE NLL
  (`pipeline.diffusion.likelihood`), the latter on uniformly dequantised pixels converted to 8-bit bins.

Images are uint8 (N, C, H, W) from shards; models see them through `pipeline.images.to_model_range` as in training.
"""
from __future__ import annotations

import math

import torch

from pipeline.diffusion.likelihood import bits_per_dim
from pipeline.evaluation import EvaluationError
from pipeline.evaluation.metrics import psnr
from pipeline.images import to_model_range


def dequantize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Spread each grid value uniformly over its bin (width 2/255): a continuous density on these points
    bounds the discrete probability of the bins (Theis et al. 2016)."""
    return x + (torch.rand(x.shape, generator=generator) - 0.5) * (2.0 / 255.0)


def _gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    per_dim = -0.5 * ((z - mean) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
    return per_dim.flatten(1).sum(1)


@torch.no_grad()
def vae_bounds(vae, x: torch.Tensor, num_importance: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample negative ELBO and negative IWAE_K in nats, from the same K posterior draws."""
    if num_importance < 1:
        raise EvaluationError(f"the number of importance samples must be >= 1, got {num_importance}")
    mu, logvar = vae.encode(x)
    log_weights = []
    for _ in range(num_importance):
        z = vae.reparameterize(mu, logvar, generator)
        log_px_z = -vae.reconstruction_nll(x, vae.decode(z))
        log_pz = _gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        log_weights.append(log_px_z + log_pz - _gaussian_log_density(z, mu, logvar))
    log_w = torch.stack(log_weights, dim=1).double()
    iwae = torch.logsumexp(log_w, dim=1) - math.log(num_importance)
    return {"nelbo": -log_w.mean(dim=1), "niwae": -iwae}


def vae_likelihood(vae, images: torch.Tensor, *, num_importance: int = 64, batch_size: int = 64,
                   seed: int = 0) -> dict[str, float]:
    """Mean ELBO/IWAE bits/dim and reconstruction PSNR (dB, posterior-mean decode) over uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    # a Gaussian likelihood is a density on [-1, 1]: convert to 8-bit bins as the VAE's own loss reports it
    num_bins = 256 if vae.likelihood == "gaussian" else None
    elbo, iwae, quality = [], [], []
    for batch in images.split(batch_size):
        x = to_model_range(batch)
        bounds = vae_bounds(vae, x, num_importance, generator)
        dims = x[0].numel()
        elbo.append(bits_per_dim(bounds["nelbo"], dims, num_bins))
        iwae.append(bits_per_dim(bounds["niwae"], dims, num_bins))
        with torch.no_grad():
            recon = vae.mean_image(vae.decode(vae.encode(x)[0]))
        quality.append(psnr(x, recon, data_range=2.0))
    return {"vae_elbo_bpd": float(torch.cat(elbo).mean()),
            f"vae_iwae{num_importance}_bpd": float(torch.cat(iwae).mean()),
            "vae_recon_psnr_db": float(torch.cat(quality).mean())}


def ddpm_likelihood(model_fn, images: torch.Tensor, schedule, *, prediction: str, vlb_steps: int | None = None,
                    ode_steps: int = 100, num_probes: int = 1, batch_size: int = 64, seed: int = 0,
                    y: torch.Tensor | None = None) -> dict[str, float]:
    """Mean VLB bits/dim (respaced to `vlb_steps`, None = the full chain) and PF-ODE NLL bits/dim."""
    from pipeline.diffusion.likelihood import ode_nll, vlb_nll

    chain = schedule if vlb_steps in (None, schedule.num_steps) else schedule.respace(vlb_steps)
    generator = torch.Generator().manual_seed(seed)
    vlb, ode = [], []
    for i, batch in enumerate(images.split(batch_size)):
        x = to_model_range(batch)
        labels = None if y is None else y[i * batch_size:i * batch_size + len(batch)]
        vlb.append(vlb_nll(model_fn, x, chain, prediction=prediction, y=labels, seed=seed + i)["bpd"])
        ode.append(ode_nll(model_fn, dequantize(x, generator), schedule, prediction=prediction, y=labels,
                           steps=ode_steps, num_probes=num_probes, num_bins=256, seed=seed + i)["bpd"])
    steps = chain.num_steps
    return {f"ddpm_vlb{steps}_bpd": float(torch.cat(vlb).mean()), "ddpm_ode_bpd": float(torch.cat(ode).mean()),
            "ode_steps": ode_steps, "ode_probes": num_probes}


def export_likelihood(inference, images: torch.Tensor, labels: torch.Tensor, *, num_importance: int = 64,
                      vlb_steps: int | None = None, ode_steps: int = 100, seed: int = 0) -> dict:
    """Likelihood metrics of held-out uint8 images under a loaded export (`load_for_inference`)."""
    cfg, model = inference.config, inference.model
    expected = (cfg.data.channels, *cfg.data.image_size)
    if tuple(images.shape[1:]) != expected:
        raise EvaluationError(f"held-out images are {tuple(images.shape[1:])} but the model at {inference.path} "
                              f"expects {expected} (C, H, W): evaluate likelihood on data of the model's shape")
    result = {"model": str(inference.path), "model_step": inference.step, "model_hash": inference.model_hash,
              "num_likelihood": len(images)}
    if cfg.model.type == "vae":
        return {**result, **vae_likelihood(model, images, num_importance=num_importance, seed=seed)}
    from pipeline.factory import build_schedule

    y = None
    if cfg.model.num_classes is not None:  # conditional model: p(x | y) with the true labels
        if bool((labels < 0).any()):
            raise EvaluationError("the model is class-conditional but some held-out samples have no label")
        y = labels
    result["conditional_on_labels"] = y is not None
    return {**result, **ddpm_likelihood(lambda x, t, c: model(x, t, c), images, build_schedule(cfg),
                                        prediction=cfg.diffusion.prediction, vlb_steps=vlb_steps,
                                        ode_steps=ode_steps, seed=seed, y=y)}
