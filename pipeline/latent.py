"""Latent diffusion: a DDPM trained on a latent shard set (`pipeline encode`) and decoded by the VAE that made it.

A latent set is just another shard payload (`npy` arrays instead of `png`); its manifest's `generator` records
the VAE's hash, the latent shape and the scale factor. A latent DDPM's config names the VAE (`model.vae`); at
the start of training `resolve_latent_config` checks the set against the VAE and the model and writes the VAE's
absolute path, hash and the scale factor into the config, so the export alone says how to decode its samples:
image = VAE mean image of decode(z / latent_scale).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError


def latent_info(shards_path: str) -> dict | None:
    """The latent record (vae_hash, latent_shape, scale_factor) of a latent shard folder; None for images."""
    from pipeline.data import shards

    if not Path(shards_path).is_dir():
        return None
    try:
        generator = shards.read_manifest(shards_path).get("generator") or {}
    except shards.ManifestError:
        return None  # the loader reports a missing or broken manifest itself
    return generator if "latent_shape" in generator else None


def resolve_latent_config(config: Config) -> Config:
    """The config with model.vae (absolute), vae_hash and latent_scale filled in from the latent set; checks that
    the set was encoded by that VAE and has the model's shape. Image configs are returned unchanged."""
    from pipeline.checkpoint import CheckpointError, load_for_inference, resolve_export

    m, d = config.model, config.data
    info = latent_info(d.shards)
    if m.vae is None:
        if info is not None and m.type == "ddpm":
            raise ConfigError(f"data.shards {d.shards} is a latent set: set model.vae to the VAE that encoded it "
                              "(its samples are decoded through it)")
        return config
    if m.type != "ddpm" or info is None:
        raise ConfigError(f"model.vae is set, but data.shards {d.shards} is not a latent set of a ddpm model "
                          "(make one with `python -m pipeline encode --vae VAE --data DIR --out DIR`)")
    try:
        vae_file = resolve_export(m.vae).resolve()
        vae = load_for_inference(vae_file)
    except CheckpointError as exn:
        raise ConfigError(f"model.vae {m.vae}: {exn}") from None
    if vae.model_hash != info["vae_hash"]:
        raise ConfigError(f"data.shards {d.shards} was encoded by VAE {info['vae_hash']}, but model.vae {m.vae} is "
                          f"VAE {vae.model_hash}: decode with the VAE that encoded the set (or re-encode it)")
    expected = [d.channels, *d.image_size]
    if list(info["latent_shape"]) != expected:
        raise ConfigError(f"data.shards {d.shards} holds latents of shape {tuple(info['latent_shape'])}, the config "
                          f"says {tuple(expected)} (data.channels, data.resolution, data.width): make them match")
    filled = dataclasses.replace(m, vae=str(vae_file), vae_hash=vae.model_hash, latent_scale=info["scale_factor"])
    return dataclasses.replace(config, model=filled)


def load_decoder(config: Config, device) -> torch.nn.Module | None:
    """The VAE a latent DDPM decodes through (None for an image model); it must be the one it was trained with."""
    from pipeline.checkpoint import CheckpointError, load_for_inference

    m = config.model
    if m.vae is None:
        return None
    vae = load_for_inference(m.vae, device=device)
    if vae.model_hash != m.vae_hash:
        raise CheckpointError(f"the latent model was trained on latents of VAE {m.vae_hash}, but {m.vae} now holds "
                              f"VAE {vae.model_hash}: restore that VAE export")
    return vae.model


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (the VAE's likelihood mean), float32."""
    return vae.mean_image(vae.decode(latents.float() / scale)).float()
