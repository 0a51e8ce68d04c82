"""Benchmark results as data: one CSV per benchmark under benchmarks/results/, every row saying where and
with what it was measured (device, commit, date, library versions), after linkedin/Liger-Kernel's benchmark data.

    from benchmarks.record import append_rows   # with the repository root on sys.path
    append_rows("eval_spacing", rows, device="cpu (x86_64, 1 threads)")

Rows are appended; a file whose columns differ from the new rows' is rewritten with the union of the columns
(missing values empty), atomically, so older rows are never lost.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LIBRARIES = ("torch", "triton", "deepspeed", "webdataset", "numpy")
COMMIT_ENV = "BENCH_COMMIT"  # the commit where there is no .git (a GPU machine gets a copy of the files)


def provenance(device: str) -> dict:
    """The columns every row carries."""
    return {"device": device, "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
            **{lib: library_version(lib) for lib in LIBRARIES}}


def device_name(device=None) -> str:
    """The device in words: the GPU's name, or the CPU and the threads torch uses."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def git_commit() -> str:
    """The checkout's commit (-dirty with uncommitted changes); where git cannot tell, $BENCH_COMMIT or 'unknown'."""
    fallback = os.environ.get(COMMIT_ENV) or "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else fallback
    except (OSError, subprocess.TimeoutExpired):
        return fallback


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def append_rows(benchmark: str, rows: list[dict], device: str, path: str | Path | None = None) -> Path:
    """Append `rows` (each with the provenance columns added) to benchmarks/results/<benchmark>.csv."""
    path = Path(path) if path else RESULTS / f"{benchmark}.csv"
    stamp = provenance(device)
    new = [{**row, **stamp} for row in rows]
    old = list(csv.DictReader(path.open(newline=""))) if path.exists() else []
    columns = list(dict.fromkeys([*(old[0].keys() if old else []), *(k for r in new for k in r)]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(old + new)
    sys.path.insert(0, str(REPO))
    from pipeline.io import atomic_write_text

    atomic_write_text(path, buf.getvalue())
    return path
