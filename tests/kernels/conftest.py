"""Kernel tests: on CPU the Triton kernels run in Triton's interpreter, on a GPU compiled.

TRITON_INTERPRET=1 must be in the environment when the kernels are decorated (when `kernels` is first
imported), so it is set here, before any test module imports them.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest.ini uses --import-mode=importlib: make the shared helper module importable by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _triton_runs_here():
    """Fail loudly (not skip) when the Triton path cannot run: a CPU run whose kernels were imported too early."""
    from kernels.dispatch import interpreter_active
    from kernel_helpers import DEVICE

    if DEVICE.type == "cpu" and not interpreter_active():
        pytest.fail("kernels was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")

