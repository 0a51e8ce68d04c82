"""`python -m pipeline sample`: a quick look at a model, as a grid PNG.

`sample_images` is also what the trainer uses for its periodic grids, so what you see during training is
exactly what this command (and generation) will produce from the same export.
"""
from __future__ import annotations

import argparse

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="an export .safetensors, a run folder (its newest export) or a checkpoint folder")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None,
                   help="DDPM ancestral, DDIM, or DPM-Solver++(2M) (default: the config's diffusion.sampler)")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: the config's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic ODE sampler)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (1 = no guidance; class-conditional models only)")
    p.add_argument("--num", type=int, default=64, help="number of images in the grid")
    p.add_argument("--seed", type=int, default=0, help="noise seed (image i depends only on seed and i)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default="grid.png", help="where to write the grid PNG")


def sample_images(inference, num: int, seed: int = 0, *, sampler: str | None = None, steps: int | None = None,
                  eta: float = 0.0, guidance: float | None = None, sample_ids: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Draw `num` images in [-1, 1] from an `Inference` (see pipeline.checkpoint.load_for_inference)."""
    cfg, model = inference.config, inference.model
    device = next(model.parameters()).device
    ids = torch.arange(num) if sample_ids is None else sample_ids
    if cfg.model.type == "vae":
        return model.sample(num, generator=torch.Generator(device).manual_seed(seed)).clamp(-1, 1)
    from pipeline.diffusion.samplers import sample
    from pipeline.factory import build_schedule, image_shape

    d = cfg.diffusion
    y = None
    if cfg.model.num_classes is not None:
        y = (ids % cfg.model.num_classes if labels is None else labels).to(device)
    shape = (num, cfg.data.channels, *image_shape(cfg))
    with torch.no_grad():
        x = sample(lambda x, t, y: model(x, t, y), shape, build_schedule(cfg).to(device),
                   sampler=sampler or d.sampler, steps=steps or d.sample_steps, eta=eta,
                   prediction=d.prediction, guidance=d.guidance if guidance is None else guidance, y=y,
                   null_class=cfg.model.num_classes, clip_x0=True, seed=seed, sample_ids=ids.to(device))
    return x.clamp(-1, 1)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import load_for_inference
    from pipeline.images import save_grid

    inference = load_for_inference(args.checkpoint, device=args.device)
    images = sample_images(inference, args.num, args.seed, sampler=args.sampler, steps=args.steps, eta=args.eta,
                           guidance=args.guidance)
    path = save_grid(images, args.out)
    print(f"wrote {path} ({args.num} images from {inference.path}, step {inference.step})")
    return 0
