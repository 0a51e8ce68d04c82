"""Images/s of generation: 50-step DDIM and 20-step DPM-Solver++(2M), per speed path, on this machine's device.

    python benchmarks/generate_throughput.py                       # CPU: tiny model, fp32, torch kernels
    python benchmarks/generate_throughput.py --config configs/cifar_ddpm.yaml --batch-size 256   # on a GPU

Rows (the `path` column):
  eager           the model as trained (fp32), the plain-torch sampler update
  fused           + the fused Triton sampler-update kernel (CUDA only)
  bf16+cl         + bf16 autocast and channels_last (CUDA only)
  bf16+cl+norm    + the fused GroupNorm + scale-shift + SiLU kernel (`generate --fused-norm`; CUDA only)
  bf16+cl+graph   bf16+cl + the model forward replayed as a CUDA graph (CUDA only): what `generate` does by default
  +compile        + torch.compile of the model (`generate --compile`; with --compile here)
  end-to-end      the whole `generate` command (sampling + PNG + tar + manifest) with its default speed path
Weights are random (speed does not depend on them); the end-to-end row writes them as a real export first.
Each row also gives model TFLOP/s (forward FLOPs per image counted once by pipeline.flops, times the steps;
the end-to-end row counts only the model too) and MFU against the device's bf16 data-sheet peak (GPUs) and
against a bf16 (GPU) / fp32 (CPU) matmul measured in the same run. The numbers are printed and written to a
CSV that names the device, commit and date. `--profile` then shows where one forward's time goes per path without
a CUDA graph (`benchmarks/profile_breakdown.py`; rows in generate_profile.csv).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoint import Inference, export_weights, weights_hash  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.factory import build_model  # noqa: E402
from pipeline.flops import flops_per_image, matmul_tflops, peak_tflops  # noqa: E402
from benchmarks.timing import append_csv, run_stamp  # noqa: E402

SAMPLERS = (("ddim", 50), ("dpmpp", 20))
# (name, precision, cuda graph, sampler-update backend, torch.compile, fused norm); each builds on the one before
# it, but for bf16+cl+norm: the graph rows keep `generate`'s defaults (unfused norms)
PATHS = (("eager", "fp32", False, "torch", False, False), ("fused", "fp32", False, "auto", False, False),
         ("bf16+cl", "bf16", False, "auto", False, False), ("bf16+cl+norm", "bf16", False, "auto", False, True),
         ("bf16+cl+graph", "bf16", True, "auto", False, False), ("+compile", "bf16", True, "auto", True, False))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(inference, sampler: str, steps: int, num: int, batch_size: int, device) -> float:
    """Sampling only (no PNG): one warm-up batch (graph capture, autotuning), then `num` images timed."""
    from pipeline.generation.sampling import sample_images
    from pipeline.generation.settings import SamplerSettings

    sampling = SamplerSettings(checkpoint="", sampler=sampler, steps=steps).sampling_for(inference.config)

    def batch(start: int, size: int):
        return sample_images(inference, range(start, start + size), sampling)

    batch(0, batch_size)
    synchronize(device)
    began = time.perf_counter()
    for start in range(0, num, batch_size):
        batch(start, min(batch_size, num - start))
    synchronize(device)
    return num / (time.perf_counter() - began)


def end_to_end(config, model, sampler: str, steps: int, num: int, batch_size: int, device) -> float:
    """The `generate` command's images/s into a temporary folder, from a real export of the weights."""
    from pipeline.generate import generate
    from pipeline.generation.settings import GenerateSettings

    with tempfile.TemporaryDirectory() as tmp:
        export = export_weights({k: v.cpu() for k, v in model.state_dict().items()}, config, 0, Path(tmp) / "run")
        common = dict(checkpoint=str(export), sampler=sampler, steps=steps, batch_size=batch_size,
                      device=str(device), progress=False)
        generate(GenerateSettings(out=f"{tmp}/warm", num_samples=batch_size, shard_size=batch_size,
                                  **common))  # capture/compile outside the clock
        began = time.perf_counter()
        generate(GenerateSettings(out=f"{tmp}/out", num_samples=num, shard_size=max(batch_size, num // 4), **common))
        return num / (time.perf_counter() - began)


def paths_for(device: torch.device, compiled: bool):
    return (PATHS if compiled else PATHS[:-1]) if device.type == "cuda" else PATHS[:1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="model config (tiny on CPU, cifar_ddpm on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num", type=int, default=256, help="images timed per row")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row (CUDA; minutes to compile)")
    p.add_argument("--profile", action="store_true",
                   help="then profile the model forward of each path without a CUDA graph (torch.profiler, by "
                        "category: convolutions, norms, attention, ..., device idle); rows go to "
                        "generate_profile.csv beside --csv")
    p.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results" / "generate_throughput.csv"),
                   help="results file to append to (one per benchmark; rows carry device, commit, date, versions)")
    args = p.parse_args()

    from pipeline.generation.sampling import fast_inference

    device = torch.device(args.device)
    config = load_config(args.config)
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    base = Inference(model, config, 0, weights_hash(model.state_dict()), Path("random-weights"))
    rows = []
    forward_flops = flops_per_image(config, train=False)
    matmul = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    peak = peak_tflops(device)

    def utilisation(rate: float, steps: int) -> str:
        tflops = rate * steps * forward_flops / 1e12
        rows[-1] += (tflops, tflops / matmul, tflops / peak if peak else None)
        return f"{tflops:8.3g} TFLOP/s  MFU {tflops / matmul:6.1%} of matmul" + (f", {tflops / peak:6.1%} of peak"
                                                                                  if peak else "")

    print(f"{forward_flops / 1e9:.3g} GFLOP/image per forward; matmul measured {matmul:.3g} TFLOP/s"
          + (f", data-sheet bf16 peak {peak} TFLOP/s" if peak else ""))
    for sampler, steps in SAMPLERS:
        for name, precision, graph, backend, compiled, fused_norm in paths_for(device, args.compile):
            os.environ["DIFFUSION_KERNELS"] = backend  # read by kernels.dispatch at every call
            fresh = dataclasses_replace(base, model=copy.deepcopy(model))  # channels_last converts in place
            inference = fast_inference(fresh, precision=precision, cuda_graph=graph, compile_model=compiled,
                                       fused_norm=fused_norm)
            rate = images_per_second(inference, sampler, steps, args.num, args.batch_size, device)
            rows.append((sampler, steps, name, rate))
            print(f"{sampler:6s} {steps:3d} steps  {name:14s} {rate:10.1f} images/s  {utilisation(rate, steps)}",
                  flush=True)
        os.environ.pop("DIFFUSION_KERNELS", None)
        rate = end_to_end(config, model, sampler, steps, args.num, args.batch_size, device)
        rows.append((sampler, steps, "end-to-end", rate))
        print(f"{sampler:6s} {steps:3d} steps  {'end-to-end':14s} {rate:10.1f} images/s  {utilisation(rate, steps)}",
              flush=True)
    write_csv(args.csv, rows, run_stamp(device), args, config, matmul)
    if args.profile:
        profile_forwards(base, model, config, args, device, forward_flops)
    return 0


def profile_forwards(base, model, config, args, device, forward_flops: float) -> None:
    """Where one denoiser forward's time goes, per speed path without a CUDA graph (a replayed graph hides its
    kernels): the busy time bounds the forward MFU a graph could reach, the idle time is what the graph removes."""
    from benchmarks.profile_breakdown import breakdown
    from pipeline.generation.sampling import fast_inference

    x = torch.randn(args.batch_size, config.data.channels, *config.data.image_size, device=device)
    t = torch.full((args.batch_size,), config.diffusion.timesteps // 2, device=device)
    rows, stamp = [], run_stamp(device)
    for name, precision, graph, backend, compiled, fused_norm in paths_for(device, args.compile):
        if graph:
            continue
        fresh = dataclasses_replace(base, model=copy.deepcopy(model))
        denoiser = fast_inference(fresh, precision=precision, cuda_graph=False, compile_model=compiled,
                                  fused_norm=fused_norm).model
        with torch.no_grad():
            denoiser(x, t)  # warm-up: cuDNN autotuning, lazy initialisation
            parts, wall = breakdown(lambda: denoiser(x, t), device, steps=5)
        busy = sum(part["ms_per_step"] for part in parts[:-1])  # the last row is the idle / untracked time
        print(f"profile of the {name} forward (batch {args.batch_size}): {wall:.3g} ms, busy {busy:.3g} ms = "
              f"{args.batch_size * forward_flops / busy / 1e9:.3g} TFLOP/s while busy")
        for part in parts:
            print(f"    {part['category']:<46} {part['ms_per_step']:>9.3f} ms  {part['share_of_wall']:>6.1%}")
            rows.append({**stamp, "config": args.config, "batch_size": args.batch_size, "path": name,
                         **part, "wall_ms_per_forward": round(wall, 3)})
    append_csv(Path(args.csv).with_name("generate_profile.csv"), rows)


def write_csv(path: str, rows, stamp: dict, args, config, matmul: float) -> None:
    params = sum(p.numel() for p in build_model(config).parameters())
    append_csv(path, [{**stamp, "config": args.config, "params": params, "batch_size": args.batch_size,
                       "sampler": sampler, "steps": steps, "path": name, "images_per_s": f"{rate:.1f}",
                       "tflops": f"{tflops:.4g}", "mfu_vs_matmul": f"{vs_matmul:.4f}",
                       "mfu_vs_peak": "" if vs_peak is None else f"{vs_peak:.4f}", "matmul_tflops": f"{matmul:.4g}"}
                      for sampler, steps, name, rate, tflops, vs_matmul, vs_peak in rows])
    print(f"({stamp['device']}, {params / 1e6:.2f}M parameters, batch {args.batch_size})")


if __name__ == "__main__":
    sys.exit(main())
