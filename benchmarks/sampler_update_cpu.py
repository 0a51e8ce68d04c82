"""CPU cost of one sampler step (`kernels.sampler_update`, torch path) against a plain torch update.

The plain update is what a minimal sampler would write: x0 from eps, the linear update, and (for a stochastic
step) `torch.randn_like` noise. The pipeline's step draws counter-based Philox noise instead (the determinism
contract), and none at all where sigma = 0 (DDIM eta=0, DPM-Solver++); its Philox runs in C (`kernels/native.py`),
and the third contender is the same step with the numpy Philox a machine without a C compiler falls back to.
Interleaved repetitions, medians (min-max), one thread (the project's CPU setting for small tensors).

    python benchmarks/sampler_update_cpu.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved, load_note, summary  # noqa: E402

SHAPES = [(4096, 1, 8, 8), (64, 3, 64, 64)]


def contenders(shape, sigma: float):
    from kernels.sampler_update import sampler_update

    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sqrt_ab, sqrt_1m_ab, c_x0, c_xt = 0.8, 0.6, 0.5, 0.4
    coeffs = torch.tensor([sqrt_ab, sqrt_1m_ab, c_x0, 0.0, c_xt, sigma])
    ids = torch.arange(shape[0])

    def plain():
        x0 = (x - sqrt_1m_ab * eps) / sqrt_ab
        out = c_x0 * x0 + c_xt * x
        return out + sigma * torch.randn_like(x) if sigma else out

    def pipeline():
        return sampler_update(x, eps, coeffs, prediction="eps", sample_ids=ids, stream=3, backend="torch")

    def pipeline_numpy_philox():  # what a machine without a C compiler runs (kernels/native.py)
        with numpy_philox():
            return pipeline()

    return {"plain torch": plain, "pipeline": pipeline, "numpy Philox": pipeline_numpy_philox}


@contextlib.contextmanager
def numpy_philox():
    from kernels import native

    compiled = native.philox_uniforms
    native.philox_uniforms = lambda: None
    try:
        yield
    finally:
        native.philox_uniforms = compiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"CPU, 1 thread; {load_note()}")
    print(f"{'shape':<18} {'sigma':>5}  {'plain torch ms':>22}  {'pipeline ms':>22}  {'ratio':>6}  "
          f"{'with numpy Philox ms':>22}  {'ratio':>6}")
    for shape in SHAPES:
        for sigma in (0.0, 0.5):
            t = interleaved(contenders(shape, sigma), repeats=args.repeats)
            plain = statistics.median(t["plain torch"])
            print(f"{'x'.join(map(str, shape)):<18} {sigma:>5}  {summary(t['plain torch']):>22}  "
                  f"{summary(t['pipeline']):>22}  {statistics.median(t['pipeline']) / plain:>5.2f}x  "
                  f"{summary(t['numpy Philox']):>22}  {statistics.median(t['numpy Philox']) / plain:>5.2f}x")


if __name__ == "__main__":
    main()
