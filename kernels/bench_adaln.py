"""Benchmark the adaLN kernels (modulated LayerNorm, gated residual) against copy bandwidth, eager and compile.

    python -m kernels.bench_adaln [--sizes 16,64,256] [--dtypes float32,bfloat16] [--hidden 1152] [--csv PATH]
        [--no-compile]

Tokens are (B, 256, hidden) (a DiT on 32x32 latents with patch 2; hidden 1152 = DiT-XL). Each op is timed
forward only and forward + autograd backward through the public API; bandwidth counts the MINIMUM bytes
(modulated LN: fwd x + out, bwd x + dout + dx; gated residual: fwd x + y + out, bwd dout + y + dy; the (B, D)
vectors and row statistics ignored) against a measured device copy of the same dtype. Eager and torch.compile
run the torch reference (`kernels.adaln.*_reference`). Made for a CUDA GPU (on CPU, as `kernels.bench`: only a
check that every case runs); writes a CSV that names the device.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import kernels
from kernels.adaln import gated_residual_reference, modulated_layer_norm_reference
from kernels.bench import DEVICE, copy_ms, device_name, median_ms, runs_here, write_results

TOKENS = 256


OPS = {  # name: (bytes per element forward, forward + backward; public op; torch reference; its inputs)
    "modulated_ln": (2, 5, kernels.modulated_layer_norm, modulated_layer_norm_reference, ("x", "a", "b")),
    "gated_residual": (3, 6, kernels.gated_residual, gated_residual_reference, ("x", "a", "y")),
}


def thunk(fn, inputs, dout, backward: bool):
    if backward:
        return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)
    return lambda: fn(*inputs)


def fused_eager_compiled_ms(fused, reference, inputs, dout, backward: bool, compiled: dict | None, key: str):
    """Median ms of the fused op, the eager reference and (unless `compiled` is None: NaN) the reference under
    torch.compile, compiled once per `key` into `compiled`."""
    t_fused = median_ms(thunk(fused, inputs, dout, backward))
    t_eager = median_ms(thunk(reference, inputs, dout, backward))
    if compiled is None:
        return t_fused, t_eager, float("nan")
    compiled.setdefault(key, torch.compile(reference, dynamic=True))
    return t_fused, t_eager, median_ms(thunk(compiled[key], inputs, dout, backward))


def run(sizes_m, dtypes, hidden: int, with_compile: bool, csv: str | None = None) -> list[dict]:
    """Rows of every op, dtype and size; each size's rows are appended to the CSV as soon as they are measured."""
    device = device_name()
    rows, compiled = [], {}
    for dtype in dtypes:
        for size_m in sizes_m:
            batch = max(1, int(size_m * 2**20) // (TOKENS * hidden))
            numel = batch * TOKENS * hidden
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            make = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen).to(dtype).requires_grad_(True)
            x, y, dout = make(batch, TOKENS, hidden), make(batch, TOKENS, hidden), make(batch, TOKENS, hidden)
            vec_a, vec_b = make(batch, hidden), make(batch, hidden)
            elem = x.element_size()
            copy_gbs = 2 * numel * elem / copy_ms(numel, dtype) / 1e6
            tensors = {"x": x, "y": y, "a": vec_a, "b": vec_b}
            for (op, (fwd_bytes, bwd_bytes, public, reference, names)), backward in itertools.product(
                    OPS.items(), (False, True)):
                inputs, bytes_per = [tensors[n] for n in names], bwd_bytes if backward else fwd_bytes
                name = f"{op}_fwd_bwd" if backward else f"{op}_fwd"
                fused = lambda *a, public=public: public(*a, backend="triton")
                t_fused, t_eager, t_compiled = fused_eager_compiled_ms(
                    fused, reference, inputs, dout, backward, compiled if with_compile else None, op)
                gbs = bytes_per * numel * elem / t_fused / 1e6
                rows.append(dict(device=device, op=name, dtype=str(dtype).replace("torch.", ""), elements=numel,
                                 hidden=hidden, fused_ms=t_fused, eager_ms=t_eager, compile_ms=t_compiled,
                                 fused_gbs=gbs, copy_gbs=copy_gbs, pct_of_copy=100 * gbs / copy_gbs,
                                 x_eager=t_eager / t_fused, x_compile=t_compiled / t_fused))
                print(format_row(rows[-1]), flush=True)
            write_results("adaln", rows[-2 * len(OPS):], device, csv)  # forward and forward + backward of each
            del x, y, dout, vec_a, vec_b
            torch.cuda.empty_cache()
    return rows


HEADER = (f"{'op':<24}{'dtype':<10}{'M elems':>8}{'fused ms':>10}{'GB/s':>8}{'% copy':>8}{'eager ms':>10}"
          f"{'x eager':>9}{'compile ms':>11}{'x compile':>10}")


def format_row(r: dict) -> str:
    return (f"{r['op']:<24}{r['dtype']:<10}{r['elements'] / 2**20:>8.4g}{r['fused_ms']:>10.3f}{r['fused_gbs']:>8.0f}"
            f"{r['pct_of_copy']:>8.1f}{r['eager_ms']:>10.3f}{r['x_eager']:>9.1f}{r['compile_ms']:>11.3f}"
            f"{r['x_compile']:>10.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="comma-separated sizes in 2**20 elements")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--hidden", type=int, default=1152, help="token width D")
    parser.add_argument("--csv", default=None, help="results file to append to (default benchmarks/results/adaln.csv)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    args = parser.parse_args(argv)
    if not runs_here("kernels.bench_adaln"):
        return 2
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}; copy bandwidth counts bytes read + written")
    print(HEADER)
    rows = run([float(s) for s in args.sizes.split(",")], [getattr(torch, d) for d in args.dtypes.split(",")],
               args.hidden, not args.no_compile, args.csv)
    print(f"appended {len(rows)} rows to {args.csv or 'benchmarks/results/adaln.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
