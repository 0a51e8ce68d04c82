"""Argument checks shared by the fused ops: clear errors that name the bad argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def batch_tensor(name: str, x: torch.Tensor) -> tuple[int, int]:
    """(batch size, elements per sample) of a (B, ...) floating tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be shaped (B, ...) with B >= 1, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x.shape[0], x[0].numel()


def same_as(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """x must have ref's shape and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def per_sample_vector(name: str, v: torch.Tensor, batch: int, device: torch.device, integer: bool = False):
    """A (B,) tensor on `device`, float32 (or int64 when `integer`)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a (B,) torch.Tensor, got {type(v).__name__}")
    if v.shape != (batch,):
        raise ValueError(f"{name} must be shaped ({batch},) (one per sample), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the data is on {device}")
    if integer and v.dtype.is_floating_point:
        raise TypeError(f"{name} must be an integer tensor, got {v.dtype}")
    return v.to(torch.int64 if integer else torch.float32).contiguous()


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
