"""`python -m pipeline evaluate`: offline metrics of a generated shard set and/or a trained export against
real shards.

`--fake DIR`: sample quality in a domain classifier's feature space. Metric names carry the feature network
(`fd_digitsnet`, `kid_fashionnet`, ...): these are not Inception FID/KID, and values compare only at the
same feature network and sample counts (both are reported).
`--checkpoint EXPORT`: likelihood of the `--real` (held-out) images in bits/dim (VAE ELBO/IWAE + PSNR, or
DDPM VLB + probability-flow ODE).
Prints a table, then as its LAST stdout line one JSON object with every metric.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.evaluation import FEATURE_NET_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # str, not Path: a URL (http://HOST/DIR, 'pipe:COMMAND {name}') would lose its '//' in a Path
    parser.add_argument("--real", required=True,
                        help="real shard set folder or URL (reference for --fake; held-out data for --checkpoint)")
    parser.add_argument("--fake", default=None, help="generated shard set folder or URL to score")
    parser.add_argument("--checkpoint", default=None,
                        help="export .safetensors, run folder or checkpoint folder: likelihood of --real under it")
    parser.add_argument("--num", type=int, default=10000,
                        help="samples drawn (seeded, without replacement) from each set for sample quality, "
                             "capped at the set's size")
    parser.add_argument("--features", choices=["auto", *FEATURE_NET_NAMES], default="auto",
                        help="feature network; auto = the one trained on the real set's source / image size")
    parser.add_argument("--fit", choices=["auto", "resize", "crop"], default="auto",
                        help="how images of another size meet the network: crop (undo data.fit: pad), resize, "
                             "or auto (crop a border of up to 25%%, else resize)")
    parser.add_argument("--knn-k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    parser.add_argument("--likelihood-num", type=int, default=256,
                        help="held-out real images used for the likelihood (the ODE NLL is costly)")
    parser.add_argument("--iwae-samples", type=int, default=64, help="importance samples K of the VAE IWAE bound")
    parser.add_argument("--vlb-steps", type=int, default=None,
                        help="respace the DDPM chain to this many steps for the VLB (default: the full chain)")
    parser.add_argument("--ode-steps", type=int, default=100, help="RK4 steps of the probability-flow ODE NLL")
    parser.add_argument("--device", default="cpu", help="torch device for the model under --checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice, KID subsets and bounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON metrics to this file")


def _format_table(result: dict) -> str:
    lines = []
    if "features" in result:
        lines.append(f"sample quality in {result['features']} features (classifier test accuracy "
                     f"{result['feature_net_test_accuracy']:.3f}); n_real={result['num_real']}, "
                     f"n_fake={result['num_fake']}")
    if "num_likelihood" in result:
        lines.append(f"likelihood of {result['num_likelihood']} held-out real images under {result['model']}")
    lines.append(f"{'metric':<36} {'value':>12}")
    lines += [f"{key:<36} {value:>12.5g}" for key, value in result.items() if isinstance(value, float)]
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: dict) -> None:
    from pipeline.data.shards import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _sample_quality(args: argparse.Namespace) -> dict:
    from pipeline.evaluation import EvaluationError
    from pipeline.evaluation.features import feature_net_for
    from pipeline.evaluation.quality import sample_quality
    from pipeline.evaluation.shardset import read_image_set

    real = read_image_set(args.real, num=args.num, seed=args.seed)
    fake = read_image_set(args.fake, num=args.num, seed=args.seed)
    net = args.features if args.features != "auto" else feature_net_for(real.source, real.manifest["image_size"])
    if min(len(real.images), len(fake.images)) <= args.knn_k:
        raise EvaluationError(f"k-NN precision/recall with --knn-k {args.knn_k} needs more samples than that "
                              f"in each set (got {len(real.images)} real, {len(fake.images)} fake)")
    result = sample_quality(real.images, fake.images, net, knn_k=args.knn_k, real_labels=real.labels,
                            seed=args.seed, fit=args.fit)
    return {**result, "fake": str(args.fake), "real_total": real.total, "fake_total": fake.total}


def _likelihood(args: argparse.Namespace) -> dict:
    from pipeline.checkpoint import load_for_inference
    from pipeline.evaluation.likelihood import export_likelihood
    from pipeline.evaluation.shardset import read_image_set

    inference = load_for_inference(args.checkpoint, device=args.device)  # CheckpointError is a user error
    held_out = read_image_set(args.real, num=args.likelihood_num, seed=args.seed)
    return export_likelihood(inference, held_out.images.to(args.device), held_out.labels.to(args.device),
                             num_importance=args.iwae_samples, vlb_steps=args.vlb_steps,
                             ode_steps=args.ode_steps, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.evaluation import EvaluationError

    # bad input raises EvaluationError (a PipelineError): pipeline.cli prints it and exits 2
    if args.fake is None and args.checkpoint is None:
        raise EvaluationError("nothing to evaluate: give --fake DIR (sample quality) and/or --checkpoint EXPORT "
                              "(likelihood of --real)")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    result = {"real": str(args.real), "seed": args.seed}
    if args.fake is not None:
        result.update(_sample_quality(args))
    if args.checkpoint is not None:
        result.update(_likelihood(args))
    print(_format_table(result))
    if args.out is not None:
        _write_json_atomic(args.out, result)
    print(json.dumps(result))
    return 0
