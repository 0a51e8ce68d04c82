"""Benchmark the fused kernels against the memory floor, the eager reference and torch.compile of it.

    python -m kernels.bench [--sizes 1,4,16,64,256] [--dtypes float32,bfloat16] [--csv PATH] [--no-compile]

For each op and size (millions of elements, 2**20) it prints the median kernel time, the achieved bandwidth
counting the MINIMUM bytes (each input read once, each output written once; per-sample scalars ignored),
that bandwidth as a share of a measured device-to-device copy of the same bytes, and the speedups over the
eager torch reference and torch.compile of the reference (both compute the same Philox noise), measured
through the public API (for the losses: forward + autograd backward, `fused ms`). The CSV
names the device. Made for a CUDA GPU; on CPU (with TRITON_INTERPRET=1) the kernels run in Triton's
interpreter and the numbers only show that every case runs (the smoke run of benchmarks/gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

import torch

import kernels
from kernels.dispatch import interpreter_active
from kernels.fused_loss import LossOptions, diffusion_loss_reference, launch_loss, q_sample_reference
from kernels.sampler_update import sampler_update_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SAMPLE_ELEMENTS = 4 * 128 * 128  # one sample: a 4-channel 128x128 latent (65536 elements)
SEED, STREAM = 1234, 1_000_007


class Case(NamedTuple):
    name: str
    bytes_per_element: int  # in units of the element size: reads + writes of the minimal pass
    build: Callable  # data -> (fused fn, reference fn, bind(reference-like fn) -> thunk, kernels-only fn or None)


def _loss_case(target: str):
    def build(data):
        x0, ab, ids = data["x0"], data["ab"], data["ids"]
        out = data["out"].detach().requires_grad_(True)

        def fused():
            loss = kernels.diffusion_loss(out, x0, ab, SEED, ids, STREAM, target=target, backend="triton").loss
            return torch.autograd.grad(loss, out)[0]

        def reference_loss(out, x0, ab, ids):
            return diffusion_loss_reference(out, x0, ab, SEED, ids, STREAM, target=target).loss

        def reference_with(loss_fn):
            return lambda: torch.autograd.grad(loss_fn(out, x0, ab, ids), out)[0]

        grad, per_sample = torch.empty_like(out), torch.empty(len(ids), device=out.device)
        kernels_only = lambda: launch_loss(out, x0, ab, None, ids, None, SEED, STREAM, LossOptions(target, 4, None),
                                           grad, per_sample)
        return fused, reference_loss, reference_with, kernels_only
    return build


def _q_sample_case(data):
    x0, ab, ids = data["x0"], data["ab"], data["ids"]

    def reference(x0, ab, ids):
        return q_sample_reference(x0, ab, SEED, ids, STREAM)

    return (lambda: kernels.q_sample(x0, ab, SEED, ids, STREAM, backend="triton"), reference,
            lambda fn: (lambda: fn(x0, ab, ids)), None)


def _sampler_case(guided: bool):
    def build(data):
        x_t, out, uncond, prev, ids = data["x0"], data["out"], data["uncond"], data["prev"], data["ids"]
        sigma = 0.0 if guided else 0.3  # DPM-Solver++(2M)+CFG is deterministic; DDPM ancestral draws noise
        coeffs = torch.tensor([0.8, 0.6, 0.5, -0.1 if guided else 0.0, 0.7, sigma], device=x_t.device)
        extra = dict(model_out_uncond=uncond, guidance=3.0, x0_prev=prev) if guided else {}

        def reference(x_t, out, uncond, prev, coeffs, ids):  # every tensor an argument: compiled once per op
            return sampler_update_reference(x_t, out, coeffs, "eps", uncond, 3.0, False, prev, SEED, ids, STREAM)

        fused = lambda: kernels.sampler_update(x_t, out, coeffs, seed=SEED, sample_ids=ids, stream=STREAM,
                                               backend="triton", **extra)
        unc, pre = (uncond, prev) if guided else (None, None)
        return fused, reference, lambda fn: (lambda: fn(x_t, out, unc, pre, coeffs, ids)), None
    return build


CASES = [
    Case("q_sample", 2, _q_sample_case),  # read x0, write x_t
    Case("loss_eps_fwd_bwd", 2, _loss_case("eps")),  # read model_out, write grad (eps is regenerated, x0 unused)
    Case("loss_v_fwd_bwd", 3, _loss_case("v")),  # read model_out and x0, write grad
    Case("sampler_ddpm", 4, _sampler_case(False)),  # read x_t, eps; write x_next, x0_hat
    Case("sampler_dpmpp2m_cfg", 6, _sampler_case(True)),  # read x_t, eps_c, eps_u, x0_prev; write 2
]


def median_ms(fn) -> float:
    if DEVICE == "cpu":  # triton.testing.do_bench needs a GPU; interpreted calls are slow: a few suffice
        fn()
        return statistics.median(_seconds(fn) for _ in range(3)) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runs_here(benchmark: str) -> bool:
    """A CUDA GPU, or on CPU Triton's interpreter (chosen before `kernels` was imported); else say so."""
    if DEVICE == "cpu" and not interpreter_active():
        print(f"{benchmark} needs a CUDA GPU, or on CPU TRITON_INTERPRET=1 in the environment (Triton's "
              "interpreter: a check that every case runs, not a measurement)", file=sys.stderr)
        return False
    return True


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return _record().device_name("cpu") + ", Triton interpreted"


def copy_ms(numel: int, dtype: torch.dtype) -> float:
    src = torch.randn(numel, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src))


def make_data(numel: int, dtype: torch.dtype) -> dict:
    batch = numel // SAMPLE_ELEMENTS
    shape = (batch, 4, 128, 128)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    data = {k: torch.randn(shape, device=DEVICE, generator=gen).to(dtype) for k in ("x0", "out", "uncond", "prev")}
    data["ab"] = torch.rand(batch, device=DEVICE, generator=gen)
    data["ids"] = torch.arange(batch, device=DEVICE)
    return data


def run(sizes_m, dtypes, with_compile: bool, csv: str | None = None) -> list[dict]:
    """Rows of every case, dtype and size; each size's rows are appended to the CSV as soon as they are measured
    (a run stopped by a time limit keeps what it finished)."""
    device = device_name()
    rows = []
    compiled = {}
    for dtype in dtypes:
        for size_m in sizes_m:
            numel = int(size_m * 2**20)
            data = make_data(numel, dtype)
            elem = data["x0"].element_size()
            copy_time = copy_ms(numel, dtype)  # copy bytes: numel read + numel written
            copy_gbs = 2 * numel * elem / copy_time / 1e6
            for case in CASES:
                fused, reference_fn, bind, kernels_only = case.build(data)
                t_fused = median_ms(fused)
                # loss rows: fused_ms is forward + autograd backward (what a trainer sees, autograd's CPU cost
                # included); kernel_ms times the kernels alone, which is what the bandwidth floor is about
                t_kernel = median_ms(kernels_only) if kernels_only else t_fused
                t_eager = median_ms(bind(reference_fn))
                t_compiled = float("nan")
                if with_compile:
                    key = (case.name, dtype)
                    if key not in compiled:
                        compiled[key] = torch.compile(reference_fn, dynamic=True)
                    t_compiled = median_ms(bind(compiled[key]))
                gbs = case.bytes_per_element * numel * elem / t_kernel / 1e6
                rows.append(dict(device=device, op=case.name, dtype=str(dtype).replace("torch.", ""),
                                 elements=numel, kernel_ms=t_kernel, fused_ms=t_fused, eager_ms=t_eager,
                                 compile_ms=t_compiled,
                                 fused_gbs=gbs, copy_gbs=copy_gbs, pct_of_copy=100 * gbs / copy_gbs,
                                 x_eager=t_eager / t_fused, x_compile=t_compiled / t_fused))
                print(_format(rows[-1]), flush=True)
            write_results("kernels", rows[-len(CASES):], device, csv)
            del data
            torch.cuda.empty_cache()
    return rows


def channels_last_cost(size_m: int = 64) -> list[str]:
    """q_sample on a channels_last x0: the wrapper makes it contiguous first; what that costs."""
    data = make_data(size_m * 2**20, torch.float32)
    x0_cl = data["x0"].to(memory_format=torch.channels_last)
    lines = []
    for label, x0 in (("contiguous", data["x0"]), ("channels_last", x0_cl)):
        t = median_ms(lambda: kernels.q_sample(x0, data["ab"], SEED, data["ids"], STREAM, backend="triton"))
        lines.append(f"channels cost: q_sample float32 {size_m}M {label}: {t:.3f} ms")
    return lines


def block_sweep(size_m: int = 64) -> list[str]:
    """Time kernel A and kernel B (eps) across block sizes (num_warps follows the block)."""
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        data = make_data(size_m * 2**20, dtype)
        out = data["out"].detach().requires_grad_(True)
        for block in (512, 1024, 2048, 4096, 8192):
            tq = median_ms(lambda: kernels.q_sample(data["x0"], data["ab"], SEED, data["ids"], STREAM,
                                                    backend="triton", block_size=block))
            grad, per_sample = torch.empty_like(out), torch.empty(len(data["ids"]), device=DEVICE)
            tl_ = median_ms(lambda: launch_loss(out, data["x0"], data["ab"], None, data["ids"], None, SEED, STREAM,
                                                LossOptions("eps", 4, block), grad, per_sample))
            lines.append(f"block sweep: {dtype} {size_m}M block {block}: q_sample {tq:.3f} ms, loss_eps {tl_:.3f} ms")
        del data, out
    return lines


HEADER = (f"{'op':<22}{'dtype':<10}{'M elems':>8}{'kernel ms':>10}{'GB/s':>8}{'% copy':>8}{'eager ms':>10}"
          f"{'fused ms':>10}{'x eager':>9}{'compile ms':>11}{'x compile':>10}")


def _format(r: dict) -> str:
    return (f"{r['op']:<22}{r['dtype']:<10}{r['elements'] / 2**20:>8.4g}{r['kernel_ms']:>10.3f}{r['fused_gbs']:>8.0f}"
            f"{r['pct_of_copy']:>8.1f}{r['eager_ms']:>10.3f}{r['fused_ms']:>10.3f}{r['x_eager']:>9.1f}"
            f"{r['compile_ms']:>11.3f}"
            f"{r['x_compile']:>10.2f}")


def write_results(benchmark: str, rows: list[dict], device: str, path: str | None) -> str:
    """Append the rows, with device, commit, date and versions, to benchmarks/results/<benchmark>.csv."""
    return str(_record().append_rows(benchmark, rows, device, path))


def _record():
    """benchmarks.record: a benchmark-only dependency (kernels/ itself needs only torch and triton)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import record

    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64,256", help="comma-separated sizes in 2**20 elements")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--csv", default=None, help="results file to append to (default benchmarks/results/kernels.csv)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--extras", action="store_true", help="also run the block-size sweep and channels_last cost")
    args = parser.parse_args(argv)
    if not runs_here("kernels.bench"):
        return 2
    sizes = [float(s) for s in args.sizes.split(",")]
    if any(s <= 0 or s * 2**20 % SAMPLE_ELEMENTS for s in sizes):
        parser.error(f"--sizes: each size must be a positive multiple of {SAMPLE_ELEMENTS / 2**20} M elements "
                     f"(one sample), got {args.sizes}")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}; copy bandwidth counts bytes read + written")
    print(HEADER)
    rows = run(sizes, dtypes, not args.no_compile, args.csv)
    extras = block_sweep() + channels_last_cost() if args.extras else []
    print("\n".join(extras))
    print(f"\n{HEADER}\n" + "\n".join(_format(r) for r in rows))
    print(f"appended {len(rows)} rows to {args.csv or 'benchmarks/results/kernels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
