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

from pipeline.cli import check_device, count, device, non_negative, output_file
from pipeline.evaluation import FEATURE_NET_NAMES, EvaluationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # str, not Path: a URL (http://HOST/DIR, 'pipe:COMMAND {name}') would lose its '//' in a Path
    parser.add_argument("--real", required=True,
                        help="real shard set folder or URL (reference for --fake; held-out data for --checkpoint)")
    parser.add_argument("--fake", default=None, help="generated shard set folder or URL to score")
    parser.add_argument("--checkpoint", default=None,
                        help="export .safetensors, run folder or checkpoint folder: likelihood of --real under it")
    parser.add_argument("--num", type=count, default=None,
                        help="samples drawn (seeded, without replacement) from EACH set for sample quality; the "
                             "metrics compare sets of one size (default: the size of the smaller set)")
    parser.add_argument("--features", choices=["auto", *FEATURE_NET_NAMES], default="auto",
                        help="feature network; auto = the one trained on the real set's source / image size")
    parser.add_argument("--fit", choices=["auto", "resize", "crop"], default="auto",
                        help="how images of another size meet the network: crop (undo data.fit: pad), resize, "
                             "or auto (crop a border of up to 25%%, else resize)")
    parser.add_argument("--knn-k", type=count, default=None,
                        help=f"k of the k-NN precision/recall manifolds (default {KNN_K})")
    parser.add_argument("--likelihood-num", type=count, default=None,
                        help=f"held-out real images used for the likelihood (the ODE NLL is costly; "
                             f"default {LIKELIHOOD_DEFAULTS['likelihood_num']})")
    parser.add_argument("--iwae-samples", type=count, default=None,
                        help="importance samples K of the VAE IWAE bound "
                             f"(default {LIKELIHOOD_DEFAULTS['iwae_samples']})")
    parser.add_argument("--vlb-steps", type=count, default=None,
                        help="respace the DDPM chain to this many steps for the VLB (default: the full chain)")
    parser.add_argument("--ode-steps", type=count, default=None,
                        help="RK4 steps of the probability-flow ODE NLL "
                             f"(default {LIKELIHOOD_DEFAULTS['ode_steps']})")
    parser.add_argument("--device", type=device, default="cpu", help="torch device for the model under --checkpoint")
    parser.add_argument("--seed", type=non_negative, default=0,
                        help="seed of the subset choice, KID subsets and bounds")
    parser.add_argument("--out", type=output_file, default=None, help="also write the JSON metrics to this file")


KNN_K = 3
LIKELIHOOD_DEFAULTS = {"likelihood_num": 256, "iwae_samples": 64, "ode_steps": 100}
VAE_ONLY, DDPM_ONLY = ("iwae_samples",), ("vlb_steps", "ode_steps")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_applicable(args: argparse.Namespace) -> None:
    """Flags of the part not run (or of the other model kind) are refused, not silently ignored."""
    if args.fake is None and args.checkpoint is None:
        raise EvaluationError("nothing to evaluate: give --fake DIR (sample quality) and/or --checkpoint EXPORT "
                              "(likelihood of --real)")
    unused = []
    if args.checkpoint is None:
        unused += [n for n in ("likelihood_num", *VAE_ONLY, *DDPM_ONLY) if getattr(args, n) is not None]
    if args.fake is None:
        unused += [n for n in ("num", "knn_k") if getattr(args, n) is not None]
        unused += [n for n in ("features", "fit") if getattr(args, n) != "auto"]
    if unused:
        needs = "--checkpoint" if args.checkpoint is None else "--fake"
        raise EvaluationError(f"{', '.join(map(_flag, unused))} given without {needs}, so nothing would use it")


def _format_table(result: dict) -> str:
    lines = []
    if "features" in result:
        lines.append(f"sample quality in {result['features']} features (classifier test accuracy "
                     f"{result['feature_net_test_accuracy']:.3f}); n_real={result['num_real']}, "
                     f"n_fake={result['num_fake']}")
    if "num_likelihood" in result:
        lines.append(f"likelihood of {result['num_likelihood']} held-out real images under {result['model']}")
    if "kid_units" in result:
        lines.append(f"kid: {result['kid_units']}; its _std is {result['kid_spread']}")
    lines.append(f"{'metric':<36} {'value':>12}")
    lines += [f"{key:<36} {value:>12.5g}" for key, value in result.items() if isinstance(value, float)]
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: dict) -> None:
    from pipeline.data.shards import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _check_sizes(args: argparse.Namespace) -> None:
    """Both sets are compared at one size (FD/KID at two sample counts mislead): fill in or check --num."""
    from pipeline.evaluation.shardset import set_size

    sizes = {"--real": set_size(args.real), "--fake": set_size(args.fake)}
    args.num = args.num or min(sizes.values())
    too_small = [f"{flag} {getattr(args, flag[2:])} has {size}" for flag, size in sizes.items() if size < args.num]
    if too_small:
        raise EvaluationError(f"--num {args.num}: {' and '.join(too_small)} samples; the metrics compare sets of "
                              f"one size (allowed: --num <= {min(sizes.values())}, or leave --num out)")
    knn_k = args.knn_k or KNN_K
    if args.num <= knn_k:
        raise EvaluationError(f"--knn-k {knn_k}: k-NN precision/recall needs more samples than k in each set "
                              f"(got {args.num}; allowed: --knn-k < {args.num})")


def _sample_quality(args: argparse.Namespace) -> dict:
    from pipeline.evaluation.features import feature_net_for
    from pipeline.evaluation.quality import sample_quality
    from pipeline.evaluation.shardset import read_image_set

    num, knn_k = args.num, args.knn_k or KNN_K
    real = read_image_set(args.real, num=num, seed=args.seed)
    fake = read_image_set(args.fake, num=num, seed=args.seed)
    net = args.features if args.features != "auto" else feature_net_for(real.source, real.manifest["image_size"])
    result = sample_quality(real.images, fake.images, net, knn_k=knn_k, real_labels=real.labels,
                            seed=args.seed, fit=args.fit)
    return {**result, "fake": str(args.fake), "real_total": real.total, "fake_total": fake.total}


def _likelihood(args: argparse.Namespace) -> dict:
    from pipeline.checkpoint import load_for_inference
    from pipeline.evaluation.likelihood import export_likelihood
    from pipeline.evaluation.shardset import read_image_set

    inference = load_for_inference(args.checkpoint, device=args.device)  # CheckpointError is a user error
    if inference.vae is not None:
        raise EvaluationError(f"--checkpoint {args.checkpoint} is a latent model: its bound is over latents, not "
                              "the --real images; evaluate its samples with --fake (likelihood: not supported)")
    kind = inference.config.model.type
    other = [n for n in (DDPM_ONLY if kind == "vae" else VAE_ONLY) if getattr(args, n) is not None]
    if other:
        raise EvaluationError(f"{', '.join(map(_flag, other))}: does not apply to the {kind} model at "
                              f"{args.checkpoint}")
    timesteps = inference.config.diffusion.timesteps
    if kind == "ddpm" and args.vlb_steps is not None and args.vlb_steps > timesteps:
        raise EvaluationError(f"--vlb-steps {args.vlb_steps} is more than the model's {timesteps} training "
                              f"timesteps (allowed: 1 to {timesteps})")
    value = {n: getattr(args, n) or default for n, default in LIKELIHOOD_DEFAULTS.items()}
    held_out = read_image_set(args.real, num=value["likelihood_num"], seed=args.seed)
    return export_likelihood(inference, held_out.images.to(args.device), held_out.labels.to(args.device),
                             num_importance=value["iwae_samples"], vlb_steps=args.vlb_steps,
                             ode_steps=value["ode_steps"], seed=args.seed)


def run(args: argparse.Namespace) -> int:
    # bad input raises EvaluationError (a PipelineError): pipeline.cli prints it and exits 2
    _check_applicable(args)
    if args.fake is not None:
        _check_sizes(args)
    check_device("--device", args.device)
    import torch

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
