"""Run configuration: typed dataclasses, loaded from YAML, overridden by dotted `key=value` arguments.

Validation happens once, at load: an unknown key or a value of the wrong type is a `ConfigError` that names
the key (and, for a typo, the closest valid key), so a bad run fails before it costs any compute.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not match the schema."""


# Field metadata: a key that may differ from the saved run's when a run resumes (it changes how long, how often
# or how observably the run goes, not what it computes). Every other key must match: resuming would mix runs.
MAY_CHANGE_ON_RESUME = {"resume": "may change"}


@dataclass
class DataConfig:
    shards: str = "data/digits"  # shard folder (with manifest.json), a brace pattern of .tar files, or a URL
    resolution: int = 8  # images are resized/padded to resolution x resolution (height x width)
    width: Optional[int] = None  # set for non-square images (e.g. 2-D points stored as 1x2 images)
    channels: int = 1
    fit: Literal["resize", "pad"] = "resize"  # how images of another size reach `resolution`
    hflip: bool = False
    shuffle_buffer: int = 1000
    num_workers: int = field(default=0, metadata=MAY_CHANGE_ON_RESUME)
    resampled: bool = False  # infinite stream with replacement (multi-node), instead of exact epochs
    max_bad_fraction: float = 0.01  # fail when more than this fraction of samples cannot be decoded
    read_retries: int = 3  # re-reads of a remote shard whose connection or command fails part-way
    read_timeout_s: float = 30.0  # a remote read that receives nothing for this long counts as failed
    # check the shards against their manifest at the start
    verify: Literal["off", "size", "sha256"] = field(default="size", metadata=MAY_CHANGE_ON_RESUME)


@dataclass
class ModelConfig:
    type: Literal["ddpm", "vae"] = "ddpm"
    network: Literal["unet", "mlp", "dit"] = "unet"  # the DDPM's denoiser; mlp for 2-D points; dit: transformer
    mlp_hidden: int = 128
    mlp_depth: int = 3
    patch_size: int = 2  # DiT only: must divide the resolution (and data.width)
    dit_hidden: int = 64
    dit_depth: int = 4
    dit_heads: int = 4
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [4])
    dropout: float = 0.0
    num_classes: Optional[int] = None  # None: unconditional; else class-conditional with a null class
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    latent_channels: int = 4  # VAE only
    likelihood: Literal["gaussian", "bernoulli", "discretized"] = "discretized"  # VAE only
    kl_weight: float = 1.0  # VAE beta
    vae: Optional[str] = None  # latent DDPM: the VAE export (or run folder) that encoded data.shards and decodes
    vae_hash: Optional[str] = None  # filled in by `train` from the latent set (pipeline/latent.py)
    latent_scale: Optional[float] = None  # filled in likewise: latents = posterior mean * latent_scale


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "cosine", "sigmoid", "scaled_linear"] = "linear"
    timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddim"  # for the sample grids written during training
    sample_steps: int = 50
    guidance: float = 1.0


@dataclass
class TrainConfig:
    steps: int = field(default=2000, metadata=MAY_CHANGE_ON_RESUME)
    micro_batch: int = 64  # per rank
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # global gradient-norm clipping (0 = off), the same at every ZeRO stage
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    ema_decay: float = 0.999
    ema_warmup_steps: int = 100  # EMA decay ramps as min(decay, (1 + n) / (10 + n)) over these steps
    seed: int = 0
    log_every: int = field(default=20, metadata=MAY_CHANGE_ON_RESUME)
    ckpt_every: int = field(default=500, metadata=MAY_CHANGE_ON_RESUME)
    keep_last: int = field(default=2, metadata=MAY_CHANGE_ON_RESUME)
    sample_every: int = field(default=500, metadata=MAY_CHANGE_ON_RESUME)  # 0 = only at the end
    num_sample_images: int = field(default=64, metadata=MAY_CHANGE_ON_RESUME)
    # fused Triton loss on CUDA when auto
    loss_backend: Literal["auto", "torch", "triton"] = field(default="auto", metadata=MAY_CHANGE_ON_RESUME)
    # consecutive non-finite steps before stopping with an error
    max_nonfinite: int = field(default=20, metadata=MAY_CHANGE_ON_RESUME)
    # testing aid: make these steps' loss NaN
    fault_nonfinite_steps: list[int] = field(default_factory=list, metadata=MAY_CHANGE_ON_RESUME)


@dataclass
class Config:
    name: str = field(default="tiny", metadata=MAY_CHANGE_ON_RESUME)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = build(Config, raw, prefix="")
    check_consistency(config)
    return config


def check_consistency(config: Config) -> None:
    """Rules that tie several keys together (one key's type is checked by `build`)."""
    m, d = config.model, config.data
    if m.type == "ddpm" and m.network == "dit":
        sizes = {d.resolution, d.width or d.resolution}
        if m.patch_size < 1 or any(s % m.patch_size for s in sizes):
            raise ConfigError(f"config key model.patch_size: {m.patch_size} does not divide the image size "
                              f"{d.resolution}x{d.width or d.resolution} (data.resolution/data.width)")
        if m.dit_heads < 1 or m.dit_hidden % m.dit_heads:
            raise ConfigError(f"config key model.dit_heads: {m.dit_heads} does not divide model.dit_hidden "
                              f"{m.dit_hidden}")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, text = item.split("=", 1)
    return key.strip(), yaml.safe_load(text) if text.strip() else ""


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def build(cls: type, raw: Any, prefix: str):
    """Construct dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = check_value(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def check_value(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return check_value(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [check_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"config key {key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def resume_conflicts(saved: dict, config: Any, prefix: str = "") -> list[str]:
    """`key: saved -> now` for every key that differs from the saved run's and may not change on resume.
    A key the saved run does not have (added since) counts as its default."""
    conflicts = []
    for f in dataclasses.fields(config):
        if f.metadata.get("resume") == "may change":
            continue
        now = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        before = saved.get(f.name, default) if isinstance(saved, dict) else saved
        if dataclasses.is_dataclass(now):
            conflicts += resume_conflicts(before if isinstance(before, dict) else {}, now, prefix=f"{prefix}{f.name}.")
        elif before != now:
            conflicts.append(f"{prefix}{f.name}: {before!r} -> {now!r}")
    return conflicts


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    from pipeline.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
