"""Loader throughput: images/s (total and per worker) for 28x28 and 64x64 shards of real images.

Builds shards in a temporary folder from real Fashion-MNIST test images (or, without the Debian package,
the scikit-learn digits) resized to each size, then times whole epochs of `StreamingLoader` (decode,
shuffle buffer, batching, normalisation) for several worker counts: "epoch" rates include each epoch's
worker start-up, "steady" rates start the clock at each epoch's first batch. num_workers=0 decodes in
the main process (one worker's worth of CPU).

    OMP_NUM_THREADS=1 python benchmarks/loader_throughput.py [--images 4000] [--workers 0 1 2] [--csv PATH]

Needs the project installed (`bash scripts/setup.sh`) or `PYTHONPATH=.`.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.record import append_rows
from pipeline.data import shards
from pipeline.data.ingest import FASHION_MNIST_DIR, load_source
from pipeline.data.loader import StreamingLoader


def real_images(count: int) -> tuple[np.ndarray, str]:
    """Up to `count` real uint8 HxW images, repeated when the source is smaller."""
    name = "fashion-mnist" if os.path.isdir(FASHION_MNIST_DIR) else "digits"
    source = load_source(name, split="test") if name == "fashion-mnist" else load_source(name)
    images = [image for image, _, _ in source.items()]
    return np.stack([images[i % len(images)] for i in range(count)]), name


def write_resized_shards(folder: Path, images: np.ndarray, size: int, channels: int, shard_size: int) -> None:
    mode = "L" if channels == 1 else "RGB"
    with shards.ShardWriter(folder, max_count=shard_size) as writer:
        for i, image in enumerate(images):
            resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).convert(mode))
            writer.add(shards.make_sample(i, shards.encode_png(resized), -1, {"source_index": i}))
    shards.write_manifest(folder, shards.make_manifest(source="benchmark", image_size=(size, size),
                                                       channels=channels, class_names=[], shards=writer.records))


def time_epochs(folder: Path, size: int, channels: int, workers: int, epochs: int,
                batch_size: int) -> tuple[float, float]:
    """Images/s over whole epochs (worker start-up included) and in steady state (from each epoch's first batch)."""
    loader = StreamingLoader(folder, batch_size=batch_size, resolution=size, channels=channels,
                             num_workers=workers, shuffle_buffer=1000)
    total_time = steady_time = 0.0
    total = steady = 0
    for _ in range(epochs):
        start = first = time.perf_counter()
        for i, batch in enumerate(loader):
            if i == 0:
                first = time.perf_counter()
            else:
                steady += len(batch.keys)
            total += len(batch.keys)
        end = time.perf_counter()
        total_time, steady_time = total_time + end - start, steady_time + end - first
    return total / total_time, steady / steady_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="images per shard set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64], help="image sizes (square)")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 3], help="channel counts to test")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per setting")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the best is reported")
    parser.add_argument("--csv", default=None, help="results file to append to (default "
                                                     "benchmarks/results/loader_throughput.csv)")
    args = parser.parse_args()

    images, name = real_images(args.images)
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)"
    print(f"loader throughput: {args.images} real {name} images per set, batch {args.batch_size}, "
          f"best of {args.repeats} x {args.epochs} epochs, {device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'size':<7} {'channels':>8} {'workers':>7} {'epoch img/s':>14} {'steady img/s':>15} "
          f"{'steady/worker':>16}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for channels in args.channels:
                folder = Path(tmp) / f"{size}x{size}x{channels}"
                write_resized_shards(folder, images, size, channels, shard_size=500)
                for workers in args.workers:
                    # best of several runs: the machine may be shared, and noise only ever slows a run down
                    runs = [time_epochs(folder, size, channels, workers, args.epochs, args.batch_size)
                            for _ in range(args.repeats)]
                    rate, steady = max(r[0] for r in runs), max(r[1] for r in runs)
                    per_worker = steady / max(1, workers)
                    rows.append({"size": f"{size}x{size}", "channels": channels, "num_workers": workers,
                                 "epoch_images_per_s": round(rate), "steady_images_per_s": round(steady),
                                 "steady_per_worker": round(per_worker), "device": device})
                    print(f"{size:>3}x{size:<3} {channels:>8} {workers:>7} {rate:>14.0f} {steady:>15.0f} "
                          f"{per_worker:>16.0f}", flush=True)
    print("appended to", append_rows("loader_throughput", rows, device, args.csv))


if __name__ == "__main__":
    main()
