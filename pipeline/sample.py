"""`python -m pipeline sample`: a quick look at a model, as a grid PNG.

The images come from `pipeline.generation.sampling.sample_images`, the same function the trainer's grids and
`generate` use, with the same sampler flags (`pipeline.generation.settings`).
"""
from __future__ import annotations

import argparse

from pipeline.generation import settings as settings_module
from pipeline.generation.settings import SampleSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(p, SampleSettings)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import load_for_inference
    from pipeline.generation.sampling import default_device, sample_images
    from pipeline.images import save_grid

    settings = SampleSettings.from_args(args)
    inference = load_for_inference(settings.checkpoint, device=settings.device or default_device())
    images = sample_images(inference, range(settings.num), settings.sampling_for(inference.config))
    path = save_grid(images, settings.out)
    print(f"wrote {path} ({settings.num} images from {inference.path}, step {inference.step})")
    return 0
