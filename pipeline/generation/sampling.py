"""Sampling for generation: images of given sample ids from a model, fast.

`sample_images` is the one place where a model's images are drawn: the trainer's grids, `sample` and
`generate` all call it, so what is seen during training is exactly what the commands produce from the same
export. Sample i's initial noise and every step's noise are counter-based on (seed, stream, i)
(docs/ARCHITECTURE.md), so an image does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import torch

from pipeline.generation.plan import GenerateError
from pipeline.generation.settings import PRECISIONS, Sampling
from pipeline.images import PIXEL_RANGE


def default_device() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def sample_images(inference, ids: Sequence[int], sampling: Sampling) -> torch.Tensor:
    """Images in [-1, 1] of the global sample ids `ids` from an `Inference` (pipeline.checkpoint)."""
    cfg, model = inference.config, inference.model
    device = next(model.parameters()).device
    if cfg.model.type == "vae":
        return model.sample(len(ids), generator=torch.Generator(device).manual_seed(sampling.seed)).clamp(*PIXEL_RANGE)
    from pipeline.diffusion.samplers import sample
    from pipeline.factory import build_schedule

    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    labels = class_labels(ids.tolist(), sampling.classes)
    shape = (len(ids), cfg.data.channels, *cfg.data.image_size)
    with torch.no_grad():
        x = sample(lambda x, t, y: model(x, t, y), shape, build_schedule(cfg).to(device),
                   sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta,
                   prediction=cfg.diffusion.prediction, guidance=sampling.guidance,
                   y=None if labels is None else labels.to(device), null_class=cfg.model.num_classes,
                   clip_x0=inference.vae is None, seed=sampling.seed, sample_ids=ids.to(device),
                   corrector_steps=sampling.corrector_steps, corrector_snr=sampling.corrector_snr,
                   spacing=sampling.spacing)
    if inference.vae is not None:  # a latent model: images are the VAE's decoding of the sampled latents
        from pipeline.latent import decode_latents

        x = decode_latents(inference.vae, x, cfg.model.latent_scale)
    return x.clamp(*PIXEL_RANGE)


def class_labels(ids: Sequence[int], classes: list[int] | None) -> torch.Tensor | None:
    """Sample i is conditioned on classes[i mod len(classes)] (None for an unconditional model)."""
    if classes is None:
        return None
    return torch.tensor([classes[i % len(classes)] for i in ids], dtype=torch.int64)


def load_of_type(path: str, device: str, *, model_type: str, flag: str, error: type, why: str = ""):
    """load_for_inference of a `model_type` model, its errors turned into `error`s naming `flag` and the path."""
    from pipeline.checkpoint import CheckpointError, load_for_inference

    try:
        inference = load_for_inference(path, device=device)
    except CheckpointError as exn:
        raise error(f"cannot load {flag} {path}: {exn}") from None
    if inference.config.model.type != model_type:
        raise error(f"{flag} {path} is a {inference.config.model.type} model, not a {model_type} model{why}")
    return inference


def load_model(checkpoint: str, device: str):
    return load_of_type(checkpoint, device, model_type="ddpm", flag="--checkpoint", error=GenerateError,
                        why=": generate needs a diffusion model, whose noise is keyed by sample id")


# ---------------------------------------------------------------- sampling fast
class FastDenoiser(torch.nn.Module):
    """The model as generation calls it: bf16 autocast, channels_last and, on CUDA, one captured CUDA graph
    per input shape (the whole UNet forward replays as one launch; inputs are copied into static buffers on
    the device, so a step makes no host-device sync). Returns float32 contiguous outputs."""

    def __init__(self, model: torch.nn.Module, *, bf16: bool = False, channels_last: bool = False,
                 cuda_graph: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.bf16, self.channels_last, self.cuda_graph = bf16, channels_last, cuda_graph
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._pool = None

    def forward(self, x, t, y=None):
        return self._replay(x, t, y) if self.cuda_graph else self._eager(x, t, y)

    def _eager(self, x, t, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x, t, y)
        return out.float().contiguous()

    def _replay(self, x, t, y):
        key = (tuple(x.shape), y is None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, y)
        graph, static = self._graphs[key]
        static["x"].copy_(x)
        static["t"].copy_(t)
        if y is not None:
            static["y"].copy_(y)
        graph.replay()
        return static["out"].clone()  # the next replay overwrites the static output

    def _capture(self, x, t, y):
        static = {"x": x.clone(), "t": t.clone(), "y": None if y is None else y.clone()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuDNN autotuning, lazy initialisation
            for _ in range(2):
                self._eager(static["x"], static["t"], static["y"])
        torch.cuda.current_stream().wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # graphs of all shapes share one pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static["out"] = self._eager(static["x"], static["t"], static["y"])
        return graph, static


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise GenerateError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def fast_inference(inference, *, precision: str, cuda_graph: bool, compile_model: bool, fused_norm: bool = False):
    """The Inference with its model wrapped for speed (same weights: the export's EMA weights). `fused_norm`
    switches the model's own norms in place."""
    from pipeline.models.unet import use_fused_norms

    device = next(inference.model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise GenerateError(f"--cuda-graph needs a CUDA device, the model is on {device}")
    if fused_norm and not use_fused_norms(inference.model):
        raise GenerateError(f"--fused-norm: this model ({inference.config.model.network}) has no GroupNorm layers")
    model = torch.compile(inference.model) if compile_model else inference.model
    wrapped = FastDenoiser(model, bf16=precision == "bf16", channels_last=device.type == "cuda",
                           cuda_graph=cuda_graph)
    return dataclasses.replace(inference, model=wrapped)


def sample_batches(inference, sampling: Sampling, ids: range, batch_size: int) -> Iterator[tuple[range, Any]]:
    """(ids, images on the host) per batch. The next batch's GPU work is queued before the current one is
    handed out, so PNG encoding of one batch overlaps the sampling of the next (no sync in between: the
    copy to the host is asynchronous and waited on by its own event)."""
    pending = None
    for start in range(ids.start, ids.stop, batch_size):
        batch = range(start, min(start + batch_size, ids.stop))
        current = (batch, *_to_host_async(sample_images(inference, batch, sampling)))
        if pending is not None:
            yield _wait(pending)
        pending = current
    if pending is not None:
        yield _wait(pending)


def _to_host_async(images: torch.Tensor):
    if images.device.type != "cuda":
        return images, None
    host = images.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _wait(item):
    batch, host, event = item
    if event is not None:
        event.synchronize()
    return batch, host
