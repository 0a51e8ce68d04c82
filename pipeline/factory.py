"""Config -> objects: the one place that turns a resolved `Config` into a model and a noise schedule."""
from __future__ import annotations

import torch

from pipeline.config import Config


def build_model(config: Config) -> torch.nn.Module:
    m, d = config.model, config.data
    if m.type == "vae":
        from pipeline.models.vae import VAE

        return VAE(in_channels=d.channels, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                   latent_channels=m.latent_channels, image_size=d.resolution, likelihood=m.likelihood)
    if m.network == "mlp":
        from pipeline.models.mlp import MLPDenoiser

        return MLPDenoiser((d.channels, *d.image_size), hidden=m.mlp_hidden, depth=m.mlp_depth)
    if m.network == "dit":
        from pipeline.models.dit import DiT

        return DiT(in_channels=d.channels, image_size=d.image_size, patch_size=m.patch_size,
                   hidden=m.dit_hidden, depth=m.dit_depth, heads=m.dit_heads, num_classes=m.num_classes)
    from pipeline.models.unet import UNet

    return UNet(in_channels=d.channels, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attention_resolutions=tuple(m.attention_resolutions),
                dropout=m.dropout, num_classes=m.num_classes, image_size=d.resolution)


def build_loss(config: Config, device: torch.device):
    """The training objective of the config's model type (pipeline/loss.py)."""
    from pipeline.loss import DiffusionLoss, VAELoss

    if config.model.type == "vae":
        return VAELoss(config)
    return DiffusionLoss(config, build_schedule(config).to(device), device)


def build_schedule(config: Config):
    from pipeline.diffusion.schedule import make_schedule

    return make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
