"""`python -m pipeline <command>`: one sub-command per module, imported only when it runs.

Each command module defines `add_arguments(parser)` and `run(args) -> int`, so `--help` stays fast
(no torch/deepspeed import) and a module owns its own flags.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "prepare": ("pipeline.data.ingest", "ingest real images into WebDataset shards with a manifest"),
    "train": ("pipeline.train", "train a DDPM or VAE through DeepSpeed from a YAML config"),
    "sample": ("pipeline.sample", "draw a quick sample grid PNG from a checkpoint or export"),
    "generate": ("pipeline.generate", "generate a synthetic data set into WebDataset shards (sharded, resumable)"),
    "encode": ("pipeline.encode", "encode an image shard set into latent shards through a VAE (sharded, resumable)"),
    "evaluate": ("pipeline.evaluation.cli", "compare a fake shard set with a real one (offline metrics)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run (its flags are needed for parsing)
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    from pipeline.errors import PipelineError

    try:
        return int(module.run(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
