"""Shared helpers of the kernel tests (a plain module: conftest names clash across test folders)."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tolerance(dtype: torch.dtype) -> dict:
    """atol/rtol from the output dtype: one ulp of 16-bit outputs (the interpreter truncates fp32->bf16,
    the GPU rounds to nearest); float32 leaves room for reordered arithmetic and, on the GPU, the hardware
    approximations of log/sin/cos inside Box-Muller."""
    if dtype == torch.float32:
        tol = 1e-4 if DEVICE.type == "cuda" else 2e-5
    else:
        tol = torch.finfo(dtype).eps
    return {"atol": tol, "rtol": tol}


def reduction_tolerance() -> dict:
    """Float32 sums over many elements in a different order (and GPU noise approximations)."""
    tol = 1e-4 if DEVICE.type == "cuda" else 1e-5
    return {"atol": tol, "rtol": tol}


def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def random_batch(batch: int, sample_shape, dtype, generator_seed: int):
    gen = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(batch, *sample_shape, generator=gen)
    return x.to(device=DEVICE, dtype=dtype)
