"""`python -m pipeline evaluate`: offline metrics of a generated shard set against a real one.

Prints a table, then as its LAST stdout line one JSON object with every metric. Metric names carry the
feature network (`fd_digitsnet`, `kid_fashionnet`, ...): these are not Inception FID/KID, and values are
comparable only at the same feature network and sample counts (both are reported).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.evaluation.features import FEATURE_NETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, required=True, help="real (reference) shard set folder")
    parser.add_argument("--fake", type=Path, required=True, help="generated shard set folder")
    parser.add_argument("--num", type=int, default=10000,
                        help="samples drawn (seeded, without replacement) from each set, capped at its size")
    parser.add_argument("--features", choices=["auto", *sorted(FEATURE_NETS)], default="auto",
                        help="feature network; auto = the one trained on the real set's source / image size")
    parser.add_argument("--knn-k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice and the KID subsets")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON metrics to this file")


def _format_table(result: dict) -> str:
    counts = f"n_real={result['num_real']}, n_fake={result['num_fake']}"
    lines = [f"feature network: {result['features']} (test accuracy {result['feature_net_test_accuracy']:.3f}); "
             f"{counts}", f"{'metric':<36} {'value':>12}"]
    for key, value in result.items():
        if isinstance(value, float):
            lines.append(f"{key:<36} {value:>12.5g}")
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.evaluation.features import feature_net_for
    from pipeline.evaluation.quality import sample_quality
    from pipeline.evaluation import EvaluationError
    from pipeline.evaluation.shardset import read_image_set

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    # bad input raises EvaluationError (a PipelineError): pipeline.cli prints it and exits 2
    real = read_image_set(args.real, num=args.num, seed=args.seed)
    fake = read_image_set(args.fake, num=args.num, seed=args.seed)
    net = args.features if args.features != "auto" else feature_net_for(real.source, real.manifest["image_size"])
    if min(len(real.images), len(fake.images)) <= args.knn_k:
        raise EvaluationError(f"k-NN precision/recall with --knn-k {args.knn_k} needs more samples than that "
                              f"in each set (got {len(real.images)} real, {len(fake.images)} fake)")
    result = sample_quality(real.images, fake.images, net, knn_k=args.knn_k, real_labels=real.labels,
                            seed=args.seed)
    result.update({"real": str(args.real), "fake": str(args.fake),
                   "real_total": real.total, "fake_total": fake.total, "seed": args.seed})
    print(_format_table(result))
    if args.out is not None:
        _write_json_atomic(args.out, result)
    print(json.dumps(result))
    return 0
