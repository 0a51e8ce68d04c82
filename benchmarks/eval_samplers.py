"""Sample quality of one export across samplers and step counts, through the real path:
`generate` -> generated shard set -> `evaluate` against real shards. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/eval_samplers.py --checkpoint RUN --real data/digits [--num 1000]
        [--grid ddpm:1000,ddim:50,ddim:20,dpmpp:20,dpmpp:10] [--likelihood-num 128] [--out results.json]

Time per image is generation wall time / images (model load excluded, device named in the header).
With --likelihood-num > 0 it also prints the export's likelihood of that many real images.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import append_rows, device_name  # noqa: E402
from pipeline.checkpoint import load_for_inference  # noqa: E402
from pipeline.evaluation.features import feature_net_for  # noqa: E402
from pipeline.evaluation.likelihood import export_likelihood  # noqa: E402
from pipeline.evaluation.quality import sample_quality  # noqa: E402
from pipeline.evaluation.shardset import read_image_set  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.generation.settings import GenerateSettings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="export file, run folder or checkpoint folder")
    parser.add_argument("--real", type=Path, required=True, help="real shard set to compare with")
    parser.add_argument("--num", type=int, default=1000, help="images generated per row (and real images used)")
    parser.add_argument("--grid", default="ddpm:1000,ddim:50,ddim:20,dpmpp:20,dpmpp:10",
                        help="comma-separated sampler:steps rows")
    parser.add_argument("--likelihood-num", type=int, default=0, help="real images for the likelihood (0: skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", type=Path, default=None, help="also write all rows as JSON")
    args = parser.parse_args()
    real = read_image_set(args.real, num=args.num, seed=0)
    net = feature_net_for(real.source, real.manifest["image_size"])
    print(f"export {args.checkpoint}; {net} features; n_real={len(real.images)}; device: {device_name(args.device)}")
    print(f"| sampler | steps | n | fd_{net} | kid_{net} | precision | recall | coverage | ms/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for item in args.grid.split(","):
        sampler, steps = item.split(":")
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            generate(GenerateSettings(checkpoint=args.checkpoint, out=folder, num_samples=args.num, sampler=sampler,
                                      steps=int(steps), device=args.device, progress=False))
            seconds = time.perf_counter() - start
            fake = read_image_set(folder)
        r = sample_quality(real.images, fake.images, net, real_labels=real.labels)
        row = {"sampler": sampler, "steps": int(steps), "n": len(fake.images), **r,
               "ms_per_image": 1000 * seconds / len(fake.images)}
        rows.append(row)
        print(f"| {sampler} | {steps} | {row['n']} | {r[f'fd_{net}']:.2f} | {r[f'kid_{net}']:.3f} | "
              f"{r[f'precision_{net}']:.3f} | {r[f'recall_{net}']:.3f} | {r['fake_class_coverage']:.1f} | "
              f"{row['ms_per_image']:.2f} |", flush=True)
    if args.likelihood_num > 0:
        held_out = read_image_set(args.real, num=args.likelihood_num, seed=1)
        inference = load_for_inference(args.checkpoint, device=args.device)
        likelihood = export_likelihood(inference, held_out.images.to(args.device), held_out.labels.to(args.device))
        print("likelihood:", json.dumps({k: v for k, v in likelihood.items() if isinstance(v, (int, float))}))
        rows.append({"likelihood": likelihood})
    print("appended to", append_rows("eval_samplers", [{"export": args.checkpoint, **r} for r in rows
                                                       if "sampler" in r], device_name(args.device)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
