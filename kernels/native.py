"""The C side of the CPU noise (`kernels/philox.c`), compiled at first use and loaded with ctypes.

Why C: Philox is ten dependent rounds of 32x32 -> 64-bit products; numpy runs each of its ~100 elementwise
passes separately (~3 ms for 65536 groups), a compiled loop keeps the words in registers (~0.6 ms with the
uniforms, bits identical). Why not a torch extension: this needs no torch headers, so it builds in ~0.2 s
with the system compiler instead of a minute, and without one the numpy generator in `kernels.noise` is used
(the same bits, slower).

The library is cached under $DIFFUSION_NATIVE_DIR (default $XDG_CACHE_HOME or ~/.cache, then
diffusion-hpc-pipeline/native), named by a hash of the source, flags and architecture, and written
atomically, so ranks and workers that build at once on a shared home never load a half-written file.
It is built for the generic architecture (AVX2 picked at load time), so one file serves every node.
DIFFUSION_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("philox.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
ENV_SWITCH, ENV_DIR = "DIFFUSION_NATIVE", "DIFFUSION_NATIVE_DIR"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffusion-hpc-pipeline" / "native"


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.machine().encode())
    return cache_dir() / f"philox-{digest.hexdigest()[:16]}.so"


def build(target: Path) -> None:
    """Compile SOURCE into `target` through a temporary file in the same folder, then an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".philox-", suffix=".so")
    os.close(fd)
    try:
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def philox_uniforms():
    """The C function `philox_uniforms` (see philox.c for its contract), or None where it cannot be built."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return None
    try:
        path = library_path()
        if not path.exists():
            build(path)
        function = ctypes.CDLL(str(path)).philox_uniforms
    except (OSError, subprocess.SubprocessError) as exn:
        detail = getattr(exn, "stderr", b"") or b""
        log.info("CPU noise uses the numpy Philox (same bits; a noisy sampler step ~2x slower): the C one "
                 "could not be built or loaded: %s %s",
                 exn, detail.decode(errors="replace")[:500])
        return None
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
                         ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    return function
