"""Loader images/s from HTTP vs local files for the same Fashion-MNIST shards, side by side in one run.

Prepares the real Fashion-MNIST shards (`python -m pipeline prepare --source fashion-mnist`; Debian package
`dataset-fashion-mnist`) unless `--shards` names a prepared folder, serves that folder with Debian's nginx on
127.0.0.1 (as the tests do), and times whole epochs of `StreamingLoader` reading the local folder and the
same folder as `http://127.0.0.1:PORT/fmnist`, alternating the two so machine load hits both alike. Reports
the best of `--repeats` per setting and HTTP's cost relative to local.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/loader_http.py [--workers 0 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loader_throughput import time_epochs  # noqa: E402
from tests.net.servers import Nginx  # noqa: E402


def prepared_shards(folder: Path, split: str) -> Path:
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", "fashion-mnist", "--split", split,
                    "--out", str(folder), "--no-progress"], check=True, cwd=REPO)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="a prepared Fashion-MNIST shard folder (default: prepare one)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="split to prepare")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per setting and source; best is reported")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(args.shards) if args.shards else prepared_shards(Path(tmp) / "fmnist", args.split)
        server = Nginx(Path(tmp) / "nginx")
        try:
            (server.www / "fmnist").symlink_to(local.resolve(), target_is_directory=True)
            remote = f"{server.url}/fmnist"
            device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)"
            print(f"loader from HTTP (nginx on loopback) vs local files: {local} (Fashion-MNIST {args.split}), "
                  f"batch {args.batch_size}, best of {args.repeats} x {args.epochs} epoch(s), {device}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
            print(f"{'workers':>7} {'local img/s':>12} {'http img/s':>11} {'http cost':>10}   (steady state: "
                  "local, http, cost)")
            for workers in args.workers:
                runs: dict[str, list[tuple[float, float]]] = {"local": [], "http": []}
                for _ in range(args.repeats):  # alternate, so load on a shared machine hits both alike
                    for name, source in (("local", local), ("http", remote)):
                        runs[name].append(time_epochs(source, 28, 1, workers, args.epochs, args.batch_size))
                best = {name: (max(r[0] for r in rs), max(r[1] for r in rs)) for name, rs in runs.items()}
                cost = [1 - best["http"][i] / best["local"][i] for i in (0, 1)]
                print(f"{workers:>7} {best['local'][0]:>12.0f} {best['http'][0]:>11.0f} {cost[0]:>9.1%}   "
                      f"({best['local'][1]:.0f}, {best['http'][1]:.0f}, {cost[1]:.1%})", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
