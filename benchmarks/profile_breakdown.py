"""Where a step's time goes: torch.profiler self times summed into categories (convolutions, norms, attention...).

On CPU each operator's SELF time counts once; on a GPU each kernel's time (by kernel name), so categories add up
to the busy time. Wall time minus busy time is, on a GPU, what the device sat idle (launch gaps, host work, syncs);
on CPU, the time outside any operator (python, DeepSpeed). Used by the `--profile` of
`benchmarks/train_throughput.py` and `benchmarks/generate_throughput.py`.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch.autograd import DeviceType

# First match wins; patterns are matched against the lower-cased operator names (CPU) or kernel names (CUDA:
# cuDNN's fprop/dgrad/wgrad convolution kernels, cuBLAS/CUTLASS gemms, at::native functor names, Triton kernels).
CATEGORIES = [
    ("compiled (inductor) graphs and kernels", r"^triton_|compiledfxgraph|compiled region|compiledfunction"),
    ("fused loss / noise kernels", r"q_sample|diffusion_loss|sampler_update"),
    ("convolutions", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("norms", r"group_?norm|layer_?norm|batch_?norm|rowwisemoments|computefusedparams|welford"),
    ("attention", r"scaled_dot_product|flash|fmha|efficient_attention|softmax|bmm"),
    ("matmuls (linear)", r"addmm|\bmm\b|aten::mm|linear|gemm|cublas|cutlass"),
    ("activations", r"silu|gelu|sigmoid"),
    ("EMA", r"lerp"),  # before the optimizer: both run multi_tensor_apply kernels
    ("optimizer", r"adam|_foreach_|multi_tensor"),
    ("copies and casts", r"copy|aten::to\b|_to_copy|contiguous|clone|cat\b|nchwtonhwc|nhwctonchw|memcpy|memset"),
    ("collectives", r"allreduce|all_reduce|broadcast|nccl|gloo"),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other (elementwise, reductions, ...)"


def breakdown(step: Callable[[], object], device: torch.device, steps: int = 2) -> tuple[list[dict], float]:
    """Profile `steps` calls of `step` (already warmed up): ([{category, ms_per_step, share}], wall ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - start) * 1e3 / steps
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        # CUDA: the kernels themselves (operators' own device time would count each kernel a second time)
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            totals[category(event.key)] = totals.get(category(event.key), 0.0) + us / 1e3 / steps
    busy = sum(totals.values())
    rows = [{"category": name, "ms_per_step": round(ms, 3), "share_of_wall": round(ms / wall, 4)}
            for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    rest = "device idle (launch gaps, host work)" if cuda else "outside operators (python, host work, waits)"
    rows.append({"category": rest, "ms_per_step": round(wall - busy, 3),
                 "share_of_wall": round((wall - busy) / wall, 4)})
    return rows, wall
