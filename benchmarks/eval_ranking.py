"""How the offline sample-quality metrics score controlled degradations of REAL images.

    OMP_NUM_THREADS=1 python benchmarks/eval_ranking.py [--num 2000] [--csv PATH]

Real set: the first `num` images; every fake set is derived from the next `num` (held out): itself, with
Gaussian noise (sigma 0.05 and 0.1), box-blurred, pixel-shuffled, and collapsed to one class. Prints one
row per (feature network, fake set) with FD, KID, precision, recall, class coverage and the seconds the
metrics took; digits use the 1797 sklearn digits (two halves), Fashion-MNIST its 10k test images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import append_rows, device_name  # noqa: E402
from pipeline.evaluation import degrade  # noqa: E402
from pipeline.evaluation.quality import sample_quality  # noqa: E402
from pipeline.evaluation.train_classifier import FASHION_DIR, load_digits_split, load_fashion_split  # noqa: E402


def real_halves(net: str, num: int):
    if net == "digitsnet":
        x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
        images, labels = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
        order = np.random.default_rng(1).permutation(len(images))
        images, labels = images[order], labels[order]
        num = min(num, len(images) // 2)
    else:
        _, _, images, labels = load_fashion_split()
    images, labels = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    return images[:num], labels[:num], images[num:2 * num], labels[num:2 * num]


def fake_sets(held_out, labels):
    return {"held-out real": held_out, "noise 0.05": degrade.add_noise(held_out, 0.05),
            "noise 0.1": degrade.add_noise(held_out, 0.1), "blur 3x3": degrade.blur(held_out),
            "shuffled pixels": degrade.shuffle_pixels(held_out),
            "one class": degrade.one_class(held_out, labels, keep=3, count=len(held_out))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000, help="images per set (digits: at most 898)")
    parser.add_argument("--csv", type=Path, default=None, help="results file to append to (default "
                                                                "benchmarks/results/eval_ranking.csv)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nets = ["digitsnet"] + (["fashionnet"] if (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file() else [])
    rows = []
    print(f"{'features':<11} {'fake set':<16} {'n':>5} {'FD':>9} {'KID':>9} {'prec':>6} {'recall':>6} "
          f"{'coverage':>8} {'s':>5}")
    for net in nets:
        real, real_labels, held_out, held_out_labels = real_halves(net, args.num)
        for name, fake in fake_sets(held_out, held_out_labels).items():
            start = time.perf_counter()
            r = sample_quality(real, fake, net, real_labels=real_labels)
            seconds = time.perf_counter() - start
            row = {"features": net, "fake": name, "n": len(fake), "fd": r[f"fd_{net}"], "kid": r[f"kid_{net}"],
                   "precision": r[f"precision_{net}"], "recall": r[f"recall_{net}"],
                   "coverage": r["fake_class_coverage"], "seconds": seconds}
            rows.append(row)
            print(f"{net:<11} {name:<16} {len(fake):>5} {row['fd']:>9.3f} {row['kid']:>9.4f} "
                  f"{row['precision']:>6.3f} {row['recall']:>6.3f} {row['coverage']:>8.2f} {seconds:>5.1f}")
    print("appended to", append_rows("eval_ranking", rows, device_name("cpu"), args.csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
