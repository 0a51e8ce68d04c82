"""Run configuration: typed dataclasses, loaded from YAML, overridden by dotted `key=value` arguments.

Validation happens once, at load: an unknown key, a value of the wrong type or outside its field's range
(`metadata={"range": ...}` on the dataclass field) is a `ConfigError` that names the key, the value and what
is allowed (and, for a typo, the closest valid key), so a bad run fails before it costs any compute.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.conventions import PREDICTIONS, SAMPLERS, SCHEDULES
from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not match the schema."""


# Field metadata: a key that may differ from the saved run's when a run resumes (it changes how long, how often
# or how observably the run goes, not what it computes). Every other key must match: resuming would mix runs.
MAY_CHANGE_ON_RESUME = {"resume": "may change"}


@dataclass(frozen=True)
class Range:
    """The allowed values of a number (or of each number in a list); a bound of None is unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        lo, hi = (f"2**{v.bit_length() - 1}" if isinstance(v, int) and v > 2**32 else v for v in (self.lo, self.hi))
        if hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


COUNT = Range(lo=1)  # sizes, step counts, intervals
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
PROBABILITY = Range(lo=0, hi=1)
DECAY = Range(lo=0, hi=1, hi_open=True)  # a factor that must shrink what it multiplies
SEED = Range(lo=0, hi=2**64, hi_open=True)  # the Philox key of the noise (kernels.noise.seed_key)


@dataclass
class DataConfig:
    shards: str = "data/digits"  # shard folder (with manifest.json), a brace pattern of .tar files, or a URL
    # images are resized/padded to resolution x resolution (height x width)
    resolution: int = field(default=8, metadata={"range": COUNT})
    # set for non-square images (e.g. 2-D points stored as 1x2 images)
    width: Optional[int] = field(default=None, metadata={"range": COUNT})
    channels: int = field(default=1, metadata={"range": COUNT})
    fit: Literal["resize", "pad"] = "resize"  # how images of another size reach `resolution`
    hflip: bool = False
    shuffle_buffer: int = field(default=1000, metadata={"range": NON_NEGATIVE})
    num_workers: int = field(default=0, metadata={"range": NON_NEGATIVE, **MAY_CHANGE_ON_RESUME})
    resampled: bool = False  # infinite stream with replacement (multi-node), instead of exact epochs
    # fail when more than this fraction of samples cannot be decoded
    max_bad_fraction: float = field(default=0.01, metadata={"range": PROBABILITY})
    # re-reads of a remote shard whose connection or command fails part-way
    read_retries: int = field(default=3, metadata={"range": NON_NEGATIVE})
    # a remote read that receives nothing for this long counts as failed
    read_timeout_s: float = field(default=30.0, metadata={"range": POSITIVE})
    # node-local folder for copies of remote shards: each node downloads a shard once, not once per loader
    # worker of every rank ($VARS expand on the node, e.g. $SLURM_TMPDIR/shards); None: stream every read
    cache_dir: Optional[str] = field(default=None, metadata=MAY_CHANGE_ON_RESUME)
    # the most the cache keeps, in GB (least recently used copies go first); None: no limit
    cache_gb: Optional[float] = field(default=None, metadata={"range": POSITIVE, **MAY_CHANGE_ON_RESUME})

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images: the one place that reads `resolution` and `width` together."""
        return self.resolution, self.width or self.resolution
    # check the shards against their manifest at the start
    verify: Literal["off", "size", "sha256"] = field(default="size", metadata=MAY_CHANGE_ON_RESUME)


@dataclass
class ModelConfig:
    type: Literal["ddpm", "vae"] = "ddpm"
    network: Literal["unet", "mlp", "dit"] = "unet"  # the DDPM's denoiser; mlp for 2-D points; dit: transformer
    mlp_hidden: int = field(default=128, metadata={"range": COUNT})
    mlp_depth: int = field(default=3, metadata={"range": COUNT})
    # DiT only: must divide the resolution (and data.width)
    patch_size: int = field(default=2, metadata={"range": COUNT})
    dit_hidden: int = field(default=64, metadata={"range": COUNT})
    dit_depth: int = field(default=4, metadata={"range": COUNT})
    dit_heads: int = field(default=4, metadata={"range": COUNT})
    base_channels: int = field(default=32, metadata={"range": COUNT})
    channel_mult: list[int] = field(default_factory=lambda: [1, 2], metadata={"range": COUNT})
    num_res_blocks: int = field(default=1, metadata={"range": COUNT})
    attention_resolutions: list[int] = field(default_factory=lambda: [4], metadata={"range": COUNT})
    dropout: float = field(default=0.0, metadata={"range": DECAY})
    # None: unconditional; else class-conditional with a null class
    num_classes: Optional[int] = field(default=None, metadata={"range": COUNT})
    p_uncond: float = field(default=0.1, metadata={"range": PROBABILITY})  # label dropout for classifier-free guidance
    latent_channels: int = field(default=4, metadata={"range": COUNT})  # VAE only
    likelihood: Literal["gaussian", "bernoulli", "discretized"] = "discretized"  # VAE only
    kl_weight: float = field(default=1.0, metadata={"range": NON_NEGATIVE})  # VAE beta
    vae: Optional[str] = None  # latent DDPM: the VAE export (or run folder) that encoded data.shards and decodes
    vae_hash: Optional[str] = None  # filled in by `train` from the latent set (pipeline/latent.py)
    # filled in likewise: latents = posterior mean * latent_scale
    latent_scale: Optional[float] = field(default=None, metadata={"range": POSITIVE})


@dataclass
class DiffusionConfig:
    schedule: Literal[SCHEDULES] = "linear"
    timesteps: int = field(default=1000, metadata={"range": COUNT})
    prediction: Literal[PREDICTIONS] = "eps"
    weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = field(default=5.0, metadata={"range": POSITIVE})
    sampler: Literal[SAMPLERS] = "ddim"  # for the sample grids written during training
    sample_steps: int = field(default=50, metadata={"range": COUNT})
    guidance: float = field(default=1.0, metadata={"range": NON_NEGATIVE})


@dataclass
class TrainConfig:
    steps: int = field(default=2000, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    # per rank; with grad_accum they may change on resume as long as the global batch stays (pipeline/elastic.py)
    micro_batch: int = field(default=64, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    grad_accum: int = field(default=1, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    lr: float = field(default=2e-3, metadata={"range": POSITIVE})
    min_lr_ratio: float = field(default=0.1, metadata={"range": PROBABILITY})  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = field(default=100, metadata={"range": NON_NEGATIVE})
    weight_decay: float = field(default=0.0, metadata={"range": NON_NEGATIVE})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"range": DECAY})
    # global gradient-norm clipping (0 = off), the same at every ZeRO stage
    grad_clip: float = field(default=1.0, metadata={"range": NON_NEGATIVE})
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = field(default=0, metadata={"range": Range(0, 3)})
    ema_decay: float = field(default=0.999, metadata={"range": PROBABILITY})
    # EMA decay ramps as min(decay, (1 + n) / (10 + n)) over these steps
    ema_warmup_steps: int = field(default=100, metadata={"range": NON_NEGATIVE})
    seed: int = field(default=0, metadata={"range": SEED})
    log_every: int = field(default=20, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    ckpt_every: int = field(default=500, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    keep_last: int = field(default=2, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    # EMA exports (export/ema-step-*.safetensors) to keep, newest first, besides those of kept checkpoints and
    # latest.safetensors; None: every one (one per checkpoint and sample grid: 154 MB each for the CIFAR UNet)
    keep_exports: Optional[int] = field(default=None, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    # 0 = only at the end
    sample_every: int = field(default=500, metadata={"range": NON_NEGATIVE, **MAY_CHANGE_ON_RESUME})
    num_sample_images: int = field(default=64, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    # fused Triton loss on CUDA when auto
    loss_backend: Literal["auto", "torch", "triton"] = field(default="auto", metadata=MAY_CHANGE_ON_RESUME)
    # torch's fused AdamW kernel (CPU and CUDA); false: its per-parameter loop
    fused_adam: bool = field(default=True, metadata=MAY_CHANGE_ON_RESUME)
    # torch.compile the model's forward and backward (the first steps compile, ~1 min; on CPU it needs a C++
    # compiler); the weights, checkpoints and exports are the same with it on or off
    compile: bool = field(default=False, metadata=MAY_CHANGE_ON_RESUME)
    # channels_last memory format for the input images and so the activations (cuDNN's fast bf16 convolutions)
    channels_last: bool = field(default=False, metadata=MAY_CHANGE_ON_RESUME)
    # GroupNorm + scale-shift + SiLU of the UNet / VAE blocks as one Triton kernel (kernels.group_norm; CUDA, on
    # CPU the same torch ops run either way); the weights, checkpoints and exports are the same with it on or off
    fused_norm: bool = field(default=False, metadata=MAY_CHANGE_ON_RESUME)
    # consecutive non-finite steps before stopping with an error
    max_nonfinite: int = field(default=20, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})
    # testing aid: make these steps' loss NaN
    fault_nonfinite_steps: list[int] = field(default_factory=list, metadata={"range": COUNT, **MAY_CHANGE_ON_RESUME})


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
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, expected a YAML file")
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
    m, d, diff, t = config.model, config.data, config.diffusion, config.train
    if diff.sample_steps > diff.timesteps:
        raise ConfigError(f"config key diffusion.sample_steps: {diff.sample_steps} is out of range "
                          f"(allowed: 1 to diffusion.timesteps = {diff.timesteps})")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"config key train.adam_betas: {t.adam_betas!r} must hold two values (beta1, beta2)")
    if not m.channel_mult:
        raise ConfigError("config key model.channel_mult: [] must hold at least one multiplier")
    if t.fused_norm and m.type == "ddpm" and m.network != "unet":
        raise ConfigError(f"config key train.fused_norm: true needs GroupNorm layers to fuse (model.network unet, "
                          f"or model.type vae); model.network {m.network} has none")
    if m.type == "ddpm" and m.network == "dit":
        if m.patch_size < 1 or any(s % m.patch_size for s in d.image_size):
            raise ConfigError(f"config key model.patch_size: {m.patch_size} does not divide the image size "
                              f"{d.image_size[0]}x{d.image_size[1]} (data.resolution/data.width)")
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = check_value(hints[key], value, f"{prefix}{key}")
        check_range(fields[key].metadata.get("range"), kwargs[key], f"{prefix}{key}")
    return cls(**kwargs)


def check_range(allowed: Range | None, value: Any, key: str) -> None:
    """`value` (or each item of a list value) must lie in `allowed`; None values (Optional keys) are unset."""
    if allowed is None or value is None:
        return
    for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
        if item not in allowed:
            where = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"config key {where}: {item!r} is out of range (allowed: {allowed})")


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
