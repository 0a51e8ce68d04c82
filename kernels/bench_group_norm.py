"""Benchmark the fused GroupNorm + scale-shift + SiLU against copy bandwidth, eager torch and torch.compile.

    python -m kernels.bench_group_norm [--sizes 16,64] [--dtypes bfloat16,float32] [--channels 128]
        [--resolution 32] [--groups 32] [--csv PATH] [--no-compile]

Activations are (B, channels, resolution, resolution), contiguous and channels_last (a CIFAR UNet's first level:
128 channels at 32x32, 32 groups). Two ops, as the UNet calls them: `gn_mod_silu` (a residual block's second
norm, modulated by the timestep embedding, then SiLU) and `gn_silu` (the first norm). Each is timed forward only
and forward + autograd backward through the public API; bandwidth counts the MINIMUM bytes (forward x + out,
backward x + dout + dx; the per-channel vectors and statistics ignored) against a measured device copy of the same
dtype. Eager and torch.compile run the torch reference (`kernels.group_norm.group_norm_act_reference`: what the
UNet runs with train.fused_norm off). Made for a CUDA GPU (on CPU, as `kernels.bench`: only a check that every
case runs); writes a CSV that names the device.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import kernels
from kernels.bench import DEVICE, copy_ms, device_name, runs_here, write_results
from kernels.bench_adaln import format_row, fused_eager_compiled_ms
from kernels.group_norm import group_norm_act_reference

OPS = ("gn_mod_silu", "gn_silu")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def op_and_inputs(op: str, groups: int, tensors: dict):
    """(fused, reference, inputs) of one op: functions of the inputs alone, so autograd.grad sees them all."""
    if op == "gn_mod_silu":
        names = ("x", "weight", "bias", "scale", "shift")

        def fused(x, w, b, s, t):
            return kernels.group_norm_act(x, groups, w, b, 1e-5, s, t, backend="triton")

        def reference(x, w, b, s, t):
            return group_norm_act_reference(x, groups, w, b, 1e-5, s, t)
    else:
        names = ("x", "weight", "bias")

        def fused(x, w, b):
            return kernels.group_norm_act(x, groups, w, b, 1e-5, backend="triton")

        def reference(x, w, b):
            return group_norm_act_reference(x, groups, w, b, 1e-5)
    return fused, reference, [tensors[n] for n in names]


def run(sizes_m, dtypes, channels: int, resolution: int, groups: int, with_compile: bool,
        csv: str | None = None) -> list[dict]:
    """Rows of every op, layout, dtype and size; each layout's rows are appended to the CSV as soon as measured."""
    device = device_name()
    rows, compiled = [], {}
    per_sample = channels * resolution * resolution
    for dtype, size_m in itertools.product(dtypes, sizes_m):
        batch = max(1, int(size_m * 2**20) // per_sample)
        numel = batch * per_sample
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        make = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)
        copy_gbs = 2 * numel * make(1).element_size() / copy_ms(numel, dtype) / 1e6
        for layout, fmt in LAYOUTS.items():
            first = len(rows)
            shape = (batch, channels, resolution, resolution)
            tensors = {"x": make(*shape).contiguous(memory_format=fmt) * 2 + 1, "weight": make(channels) + 1,
                       "bias": make(channels), "scale": make(batch, channels) * 0.3, "shift": make(batch, channels)}
            tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
            dout = make(*shape).contiguous(memory_format=fmt)
            elem = dout.element_size()
            for op, backward in itertools.product(OPS, (False, True)):
                fused, reference, inputs = op_and_inputs(op, groups, tensors)
                t_fused, t_eager, t_compiled = fused_eager_compiled_ms(
                    fused, reference, inputs, dout, backward, compiled if with_compile else None, op)
                gbs = (5 if backward else 2) * numel * elem / t_fused / 1e6
                rows.append(dict(device=device, op=f"{op}_fwd_bwd" if backward else f"{op}_fwd", layout=layout,
                                 dtype=str(dtype).replace("torch.", ""), elements=numel, channels=channels,
                                 resolution=resolution, groups=groups, fused_ms=t_fused, eager_ms=t_eager,
                                 compile_ms=t_compiled, fused_gbs=gbs, copy_gbs=copy_gbs,
                                 pct_of_copy=100 * gbs / copy_gbs, x_eager=t_eager / t_fused,
                                 x_compile=t_compiled / t_fused))
                print(format_row(rows[-1]) + f"  {layout}", flush=True)
            write_results("group_norm", rows[first:], device, csv)  # kept if a time limit stops the next layout
            del tensors, dout
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    from kernels.bench_adaln import HEADER

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64", help="comma-separated sizes in 2**20 elements")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    parser.add_argument("--channels", type=int, default=128, help="channels C of the (B, C, R, R) activations")
    parser.add_argument("--resolution", type=int, default=32, help="spatial size R")
    parser.add_argument("--groups", type=int, default=32, help="GroupNorm groups (must divide --channels)")
    parser.add_argument("--csv", default=None,
                        help="results file to append to (default benchmarks/results/group_norm.csv)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    args = parser.parse_args(argv)
    if args.channels < 1 or args.groups < 1 or args.channels % args.groups:
        parser.error(f"--groups {args.groups} must be a positive divisor of --channels {args.channels}")
    if not runs_here("kernels.bench_group_norm"):
        return 2
    print(f"device: {device_name()}; torch {torch.__version__}; copy bandwidth counts bytes read + written")
    print(HEADER + "  layout")
    rows = run([float(s) for s in args.sizes.split(",")], [getattr(torch, d) for d in args.dtypes.split(",")],
               args.channels, args.resolution, args.groups, not args.no_compile, args.csv)
    print(f"appended {len(rows)} rows to {args.csv or 'benchmarks/results/group_norm.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
