"""Train the feature networks of the offline metrics once, with a fixed seed, on the real training data.

    python -m pipeline.evaluation.train_classifier --net digitsnet
    python -m pipeline.evaluation.train_classifier --net fashionnet   # needs dataset-fashion-mnist (apt)

Writes `weights/<net>.safetensors` and `weights/<net>.json` (test accuracy on held-out data, seed, epochs,
sizes, sha256 of the weights) atomically. digitsnet: sklearn's 1797 8x8 digits, a stratified 75/25 split.
fashionnet: the 60k Fashion-MNIST training images, tested on the official 10k test images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import ingest, shards
from pipeline.evaluation.features import FEATURE_NETS, WEIGHTS_DIR, weights_paths

FASHION_DIR = Path(ingest.FASHION_MNIST_DIR)
TRAINING = {  # net -> (epochs, learning rate, batch size)
    "digitsnet": (40, 2e-3, 64),
    "fashionnet": (2, 1e-3, 64),
}


def load_digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (N, 1, 8, 8) images, mapped 0..16 -> 0..255 exactly as `prepare` writes them; stratified 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = ingest.digits_to_uint8(digits.images)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    return x_tr, y_tr, x_te, y_te


def load_fashion_split(root: str | Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official 60k/10k Fashion-MNIST split as uint8 (N, 1, 28, 28) images and int64 labels."""
    folder = Path(root)
    parts = []
    for split in ("train", "test"):
        prefix = ingest.IDX_PREFIX[split]
        images = ingest.read_idx(ingest.find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = ingest.read_idx(ingest.find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        parts += [images[:, None].copy(), labels.astype(np.int64)]  # copy: frombuffer arrays are read-only
    return tuple(parts)


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    net.eval()
    x = torch.from_numpy(images).float() / 255.0
    predicted = torch.cat([net(x[i:i + 1024])[1].argmax(1) for i in range(0, len(x), 1024)])
    return float((predicted.numpy() == labels).mean())


def train(name: str, seed: int, x_tr: np.ndarray, y_tr: np.ndarray) -> torch.nn.Module:
    epochs, lr, batch_size = TRAINING[name]
    torch.manual_seed(seed)
    net = FEATURE_NETS[name].build()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x = torch.from_numpy(x_tr).float() / 255.0
    y = torch.from_numpy(y_tr.astype(np.int64))
    order_rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=order_rng).split(batch_size):
            loss = F.cross_entropy(net(x[idx])[1], y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def write_shipped_file(path: Path, data: bytes) -> None:
    shards.atomic_write_bytes(path, data)
    path.chmod(0o644)  # the temporary file was 0600; shipped files must be readable by everyone


def save(name: str, net: torch.nn.Module, record: dict, out_dir: Path) -> None:
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_file, record_file = weights_paths(name, out_dir)
    blob = save({k: v.contiguous() for k, v in net.state_dict().items()})
    write_shipped_file(weights_file, blob)
    record = {**record, "weights_sha256": hashlib.sha256(blob).hexdigest(), "weights_bytes": len(blob)}
    write_shipped_file(record_file, (json.dumps(record, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=sorted(FEATURE_NETS), required=True, help="which network to train")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and batch order")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for <net>.safetensors/.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed) if args.net == "digitsnet" else load_fashion_split()
    start = time.perf_counter()
    net = train(args.net, args.seed, x_tr, y_tr)
    seconds = time.perf_counter() - start
    epochs, lr, batch_size = TRAINING[args.net]
    record = {
        "name": args.net, "data": FEATURE_NETS[args.net].source, "seed": args.seed,
        "test_accuracy": accuracy(net, x_te, y_te), "train_accuracy": accuracy(net, x_tr, y_tr),
        "num_train": len(x_tr), "num_test": len(x_te), "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    save(args.net, net, record, args.out)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
