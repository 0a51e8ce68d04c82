"""Side-by-side timing for the benchmarks: interleaved repetitions, medians with min-max, the machine's load.

Interleaving (A, B, A, B, ...) lets a busy machine slow every contender alike, so a RATIO of medians is
meaningful even when the absolute times are not; `load_note()` says how busy the machine was.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 7, sync: Callable = lambda: None,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, `repeats` rounds, each round calling every contender once."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float], scale: float = 1e3) -> str:
    """'median (min-max)' in milliseconds by default."""
    return f"{statistics.median(seconds) * scale:.3g} ({min(seconds) * scale:.3g}-{max(seconds) * scale:.3g})"


def load_note() -> str:
    load1, _, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    busy = " - BUSY: absolute times are inflated, compare the ratios" if load1 > cores else ""
    return f"load average {load1:.1f} on {cores} cores{busy}"


def run_stamp(device) -> dict:
    """What every benchmark row names (`benchmarks/record.py`: device, commit, date, versions) and the load."""
    from benchmarks.record import device_name, provenance

    return {**provenance(device_name(device)), "load": round(os.getloadavg()[0], 1)}


def append_csv(path, rows: list[dict]) -> None:
    """Append rows to the benchmark's one results file (new columns widen it; old rows are kept)."""
    from benchmarks.record import append_rows

    print(f"appended {len(rows)} row(s) to {append_rows('', rows, rows[0]['device'], path)}")
