"""One settings object per image-drawing command; the flags are declared once, on the dataclass fields.

`add_arguments(parser, Settings)` builds the argparse flags from the fields (flag name, type, default, help),
`Settings.from_args(args)` fills the object back, and the object checks itself: what can be checked without
the model when it is made, the rest against the model's config in `sampling_for(config)`. Every check raises
`SettingsError`, which the CLI prints as one line and exit status 2.

No torch import here: `--help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import warnings

from pipeline.conventions import DEFAULT_SPACING, SAMPLERS, SPACINGS
from pipeline.errors import PipelineError

PRECISIONS = ("auto", "fp32", "bf16")
SPACING_BEFORE_THE_FLAG = {"ddpm": "linear", "ddim": "linear", "dpmpp": "logsnr"}
STABLE_SPACINGS = {"dpmpp": ("logsnr",)}  # DPM-Solver++(2M) at few steps, measured (benchmarks/eval_spacing.py)
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 256
CHECKPOINT_HELP = "an export .safetensors, a run folder (its newest export) or a checkpoint folder"


class SettingsError(PipelineError, ValueError):
    """A flag value the command cannot use: the message names the flag, the value and what is allowed."""


class SamplingWarning(UserWarning):
    """Settings that work but are known to sample poorly."""


def flag(help: str, default: Any = dataclasses.MISSING, **argparse_kwargs) -> Any:
    """A settings field and its command-line flag (`--field-name` unless `flag=` says otherwise)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class Sampling:
    """The complete, explicit sampler settings for one model (config defaults filled in)."""
    sampler: Optional[str]
    steps: Optional[int]
    eta: float
    guidance: float
    seed: int
    classes: Optional[list[int]]  # sample i is conditioned on classes[i % len(classes)]; None: unconditional
    corrector_steps: int = 0
    corrector_snr: float = 0.1
    spacing: Optional[str] = None

    def record(self) -> dict:
        """These settings as data. The corrector only when it is used and the spacing only when it is not the
        one every sampler used before --spacing existed, so folders and shards written before keep their
        bytes and resume."""
        record = dataclasses.asdict(self)
        if not self.corrector_steps:
            del record["corrector_steps"], record["corrector_snr"]
        if self.spacing == SPACING_BEFORE_THE_FLAG.get(self.sampler):
            del record["spacing"]
        return record


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """The flags that choose how images are drawn; shared by `sample` and `generate`."""
    checkpoint: str = flag(CHECKPOINT_HELP)
    sampler: Optional[str] = flag("DDPM ancestral, DDIM, or DPM-Solver++(2M) (default: the config's "
                                  "diffusion.sampler)", None, choices=SAMPLERS)
    steps: Optional[int] = flag("sampling steps, 1..the model's timesteps (default: the config's sample_steps)",
                                None)
    eta: float = flag("DDIM stochasticity (0 = deterministic; ddim only)", 0.0)
    guidance: Optional[float] = flag("classifier-free guidance scale w (1 = none; class-conditional models only; "
                                     "default: the config's diffusion.guidance)", None)
    classes: Optional[list[int]] = flag("class ids to condition on, cycled by sample id (default: all classes of a "
                                        "class-conditional model)", None)
    seed: int = flag("noise seed: sample i depends only on (seed, i)", 0)
    spacing: Optional[str] = flag("which steps a short run takes: linear in t, trailing (from the last step, "
                                  f"none at t = 0) or logsnr (default per sampler: {DEFAULT_SPACING})", None,
                                  choices=SPACINGS)
    corrector_steps: int = flag("Langevin corrector steps after each predictor step but the last (0 = none; "
                                "each costs one more model call)", 0)
    corrector_snr: float = flag("the corrector's signal-to-noise ratio r (its step size)", 0.1)
    device: Optional[str] = flag("torch device (default: cuda:$LOCAL_RANK if available, else cpu)", None)

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise SettingsError(f"--steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise SettingsError(f"--eta must be >= 0 (the DDIM noise level), got {self.eta}")
        if self.corrector_steps < 0 or self.corrector_snr <= 0:
            raise SettingsError(f"--corrector-steps must be >= 0 and --corrector-snr > 0, got "
                                f"{self.corrector_steps}, {self.corrector_snr}")

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def sampling_for(self, config) -> Sampling:
        """These settings completed by, and checked against, the model's config."""
        if config.model.type != "ddpm":
            return self._sampling_for_vae(config)
        d, num_classes = config.diffusion, config.model.num_classes
        sampler, steps = self.sampler or d.sampler, self.steps or d.sample_steps
        if steps > d.timesteps:
            raise SettingsError(f"--steps must be in [1, {d.timesteps}] (the model's timesteps), got {steps}")
        if self.eta != 0 and sampler != "ddim":
            raise SettingsError(f"--eta {self.eta}: eta is the DDIM noise level and applies to --sampler ddim only "
                                f"(this model samples with {sampler})")
        if num_classes is None:
            if self.classes or (self.guidance is not None and self.guidance != 1.0):
                raise SettingsError(f"--checkpoint {self.checkpoint} is an unconditional model: --classes and "
                                    "--guidance need a class-conditional model (model.num_classes)")
            return Sampling(sampler, int(steps), float(self.eta), 1.0, int(self.seed), None, *self._corrector(),
                            self._spacing(sampler))
        classes = list(range(num_classes)) if not self.classes else [int(c) for c in self.classes]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise SettingsError(f"--classes {bad} out of range: the model has classes 0..{num_classes - 1}")
        guidance = float(d.guidance if self.guidance is None else self.guidance)
        return Sampling(sampler, int(steps), float(self.eta), guidance, int(self.seed), classes, *self._corrector(),
                        self._spacing(sampler))

    def _corrector(self) -> tuple[int, float]:
        return int(self.corrector_steps), float(self.corrector_snr)

    def _spacing(self, sampler: str) -> str:
        spacing = self.spacing or DEFAULT_SPACING[sampler]
        if spacing not in STABLE_SPACINGS.get(sampler, SPACINGS):
            warnings.warn(f"--spacing {spacing} with --sampler {sampler}: {sampler} is inaccurate at few steps with "
                          f"this spacing (see README: samplers); its stable spacing is "
                          f"{' or '.join(STABLE_SPACINGS[sampler])}", SamplingWarning, stacklevel=3)
        return spacing

    def _sampling_for_vae(self, config) -> Sampling:
        given = [name for name in ("sampler", "steps", "guidance", "classes", "spacing")
                 if getattr(self, name) is not None]
        given += [name for name in ("eta", "corrector_steps") if getattr(self, name) != 0]
        if given:
            raise SettingsError(f"--checkpoint {self.checkpoint} is a {config.model.type} model: "
                                f"{', '.join('--' + g.replace('_', '-') for g in given)} apply to diffusion (ddpm) "
                                "models only")
        return Sampling(None, None, 0.0, 1.0, int(self.seed), None)


def default_sampling(config, seed: int = 0) -> Sampling:
    """The config's own sampler settings (what the trainer's grids use)."""
    return SamplerSettings(checkpoint="", seed=seed).sampling_for(config)


@dataclass(frozen=True, kw_only=True)
class SampleSettings(SamplerSettings):
    """`python -m pipeline sample`: a grid PNG."""
    num: int = flag("number of images in the grid", 64)
    out: str = flag("where to write the grid PNG", "grid.png")

    def __post_init__(self):
        super().__post_init__()
        if self.num < 1:
            raise SettingsError(f"--num must be >= 1, got {self.num}")


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(SamplerSettings):
    """`python -m pipeline generate`: a data set as shards, split over tasks and ranks."""
    num_samples: int = flag("size of the whole data set (all tasks)")
    out: str = flag("output folder: shard-%%06d.tar, manifest.json, generation.json; or a remote one: "
                    "http(s)://HOST/DIR (HTTP PUT) or 'pipe:COMMAND {name}' (an upload command)")
    state: Optional[str] = flag("local state folder for a remote --out (spec, done records, shards, upload "
                                "records; shared by all tasks); default generate-state/<hash of --out>", None)
    shard_size: int = flag(f"samples per shard (default {DEFAULT_SHARD_SIZE}); shard s holds ids [s*K, (s+1)*K)",
                           DEFAULT_SHARD_SIZE)
    task_index: int = flag("this task's index k: it writes shards k, k+n, ...", 0)
    num_tasks: int = flag("number of tasks n splitting the shards", 1)
    batch_size: int = flag(f"images per forward pass (default {DEFAULT_BATCH_SIZE}); does not change the images",
                           DEFAULT_BATCH_SIZE)
    precision: str = flag("model arithmetic: bf16 autocast, fp32, or auto (bf16 on a CUDA GPU that has it)",
                          "auto", choices=PRECISIONS)
    cuda_graph: Optional[bool] = flag("replay the model forward as a captured CUDA graph (default: on with CUDA)",
                                      None, action=argparse.BooleanOptionalAction)
    compile_model: bool = flag("torch.compile the model first (slower start)", False, flag="--compile")
    fused_norm: bool = flag("the UNet's GroupNorm + scale-shift + SiLU as one Triton kernel (CUDA; its images differ "
                            "from the unfused ones in the last bits, so the data set's spec records it)", False)
    verify: bool = flag("check the sha256 of finished shards and regenerate those that differ", False)
    progress: bool = flag("hide the progress bar", True, flag="--no-progress", action="store_false")

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise SettingsError(f"--num-samples, --shard-size and --batch-size must be >= 1, got {self.num_samples}, "
                                f"{self.shard_size}, {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def add_arguments(parser: argparse.ArgumentParser, settings: type) -> None:
    """One flag per field of the dataclass `settings`, in field order."""
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        meta = dict(f.metadata)
        name = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kwargs = {"dest": f.name, **meta}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        kwargs.update(_type_kwargs(hints[f.name]) if "action" not in meta else {})
        parser.add_argument(name, **kwargs)


def _type_kwargs(hint: Any) -> dict:
    """argparse's type/nargs/action for a field type: X, Optional[X], list[X] or bool."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": "store_true"}
    if typing.get_origin(hint) is list:
        return {"type": typing.get_args(hint)[0], "nargs": "+"}
    return {"type": hint}
