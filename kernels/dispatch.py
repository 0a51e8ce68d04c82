"""Pick the implementation of a fused op: Triton on CUDA tensors, the torch reference otherwise.

Order of precedence: the `backend=` argument, then the DIFFUSION_KERNELS environment variable
(`torch`, `triton` or `auto`), then `auto`. On CPU tensors, Triton runs only in its interpreter,
which Triton enables when TRITON_INTERPRET=1 is set before `triton` (and so `kernels`) is imported.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "DIFFUSION_KERNELS"


@functools.cache  # fixed once the kernels are decorated; cached since the wrappers ask on every call
def interpreter_active() -> bool:
    """True when Triton kernels of this package were decorated in interpret mode (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .noise import normal4

    return isinstance(normal4, InterpretedFunction)


def requested_backend(backend: str | None = None) -> str:
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} is {choice!r}; expected one of {', '.join(BACKENDS)}")
    return choice


def choose_backend(*tensors: torch.Tensor | None, backend: str | None = None) -> str:
    """'triton' or 'torch' for an op on these tensors (None entries are ignored)."""
    choice = requested_backend(backend)
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if choice == "auto":
        # On CPU `auto` stays on torch even in interpret mode: the interpreter is for tests (~2 ms a program).
        return "triton" if on_cuda else "torch"
    if choice == "triton" and not on_cuda and not interpreter_active():
        raise RuntimeError(
            "backend 'triton' was asked for on CPU tensors, but Triton's interpreter is off: set "
            "TRITON_INTERPRET=1 in the environment before importing triton/kernels, move the tensors "
            "to a CUDA device, or use backend='torch'"
        )
    return choice

