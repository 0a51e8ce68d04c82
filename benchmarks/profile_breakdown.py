"""Where a step's time goes: torch.profiler self times summed into categories (convolutions, norms, attention...).

Each operator's SELF time counts once (on a GPU: the device time of the kernels it launched; on CPU: its CPU
time), so categories add up to the busy time; on a GPU, wall time minus busy time is what the device sat idle
(launch gaps, host work, syncs); on CPU it is the time outside any operator (python, DeepSpeed). Used by `benchmarks/train_throughput.py --profile`.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch

# First match wins; patterns are matched against the profiler's operator or kernel name, lower-cased.
CATEGORIES = [
    ("compiled (inductor) kernels", r"^triton_|compiledfunction|torchdynamo"),
    ("fused loss / noise kernels", r"q_sample|diffusion_loss|sampler_update"),
    ("convolutions", r"conv|cudnn|xmma|implicit_gemm|winograd"),
    ("norms", r"group_?norm|layer_?norm|batch_?norm"),
    ("attention", r"scaled_dot_product|flash|efficient_attention|softmax|bmm"),
    ("matmuls (linear)", r"addmm|\bmm\b|aten::mm|linear|gemm|cublas"),
    ("activations", r"silu|gelu|sigmoid"),
    ("optimizer", r"adam|_foreach_(?!lerp)|multi_tensor"),
    ("EMA", r"lerp"),
    ("copies and casts", r"copy|aten::to\b|_to_copy|contiguous|clone|cat\b|elementwise_kernel.*copy"),
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
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            totals[category(event.key)] = totals.get(category(event.key), 0.0) + us / 1e3 / steps
    busy = sum(totals.values())
    rows = [{"category": name, "ms_per_step": round(ms, 3), "share_of_wall": round(ms / wall, 4)}
            for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    rest = "device idle (launch gaps, host work)" if cuda else "outside operators (python, DeepSpeed, waits)"
    rows.append({"category": rest, "ms_per_step": round(wall - busy, 3), "share_of_wall": round((wall - busy) / wall, 4)})
    return rows, wall
