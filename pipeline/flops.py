"""Model FLOPs per image and utilisation (MFU): what share of the hardware's matmul peak a step achieves.

FLOPs are counted once, with `torch.utils.flop_counter` (matmuls, convolutions, attention: 2 per
multiply-add; elementwise work is not counted, as is usual for MFU), on a copy of the model on the meta
device, so counting allocates nothing and touches no real weights. Utilisation is reported against two
references: the device's dense bf16 peak from its data sheet (`PEAK_BF16_TFLOPS`, GPUs only) and a matmul
measured in the same process (`matmul_tflops`), which is what the hardware gives a large GEMM here.
"""
from __future__ import annotations

import time

import torch

from pipeline.config import Config

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (so "A100" is listed before "A10").
PEAK_BF16_TFLOPS = [
    ("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
]


def flops_per_image(config: Config, train: bool = True) -> float:
    """Model FLOPs for one image: forward (+ backward when `train`) of the configured network."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.factory import build_model

    batch = 2
    with torch.device("meta"):
        model = build_model(config)
        x = torch.zeros(batch, config.data.channels, *config.data.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        # y=None: a class label adds an embedding lookup (no FLOPs), and its range check needs real values
        out = model.loss(x)[0] if config.model.type == "vae" else model(x, t, None)
        if train:
            out.float().sum().backward()
    return counter.get_total_flops() / batch


def peak_tflops(device: torch.device) -> float | None:
    """The data-sheet dense bf16 peak of a CUDA device, None when unknown (or on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """TFLOP/s of a square matmul measured here: the reachable peak for this device, dtype and moment."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (cuBLAS heuristics, allocator)
    sync()
    best = float("inf")
    for _ in range(repeats):  # the fastest run: interruptions only ever slow a run down
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12
