"""What "every worker reads every shard" costs: one reader (rank 0 of W, no loader workers) through a whole epoch.

A reader decodes only its 1/W share of the global stream but goes through all of it (benchmarks/NOTES.md), so
the time at large W is the per-sample cost of the stream itself, paid by every reader whatever W is. Builds
64x64x3 PNG shards of real Fashion-MNIST images (the scikit-learn digits without the Debian package) in a
temporary folder, then times one epoch per W, the W values interleaved and repeated.

    OMP_NUM_THREADS=1 python benchmarks/loader_scan.py [--images 20000] [--worlds 1 8 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.loader_throughput import real_images, write_resized_shards
from pipeline.data.loader import StreamingLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="images in the shard set (default 20000)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64],
                        help="world sizes W; the reader is rank 0 of W (default 1 8 64)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the world sizes (default 2)")
    args = parser.parse_args()

    images, source = real_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        write_resized_shards(folder, images, 64, 3, args.shard_size)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6
        print(f"{source}: {args.images} images, 64x64x3 PNG, {size_mb:.1f} MB in "
              f"{len(list(folder.glob('*.tar')))} shards")
        for _ in range(args.repeats):
            for world in args.worlds:
                loader = StreamingLoader(folder, batch_size=16, resolution=64, channels=3, rank=0,
                                         world_size=world, num_workers=0, shuffle_buffer=1000)
                start = time.perf_counter()
                decoded = sum(len(batch.keys) for batch in loader)
                seconds = time.perf_counter() - start
                print(f"W={world:4d}: whole stream {seconds:6.2f} s ({size_mb / seconds:6.1f} MB/s, "
                      f"{seconds / args.images * 1e6:5.1f} us per sample), {decoded} images decoded")


if __name__ == "__main__":
    main()
