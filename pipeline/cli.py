"""`python -m pipeline <command>`: one sub-command per module, imported only when it runs.

Each command module defines `add_arguments(parser)` and `run(args) -> int`, so `--help` stays fast
(no torch/deepspeed import) and a module owns its own flags. Flags are checked at parse time by the
argument types below, before anything heavy is imported or anything is written.

Every user error ends here as ONE line on stderr and exit status 2: argparse's own errors, a bad flag value
(`--out: ... is a file, expected a folder`) and any `PipelineError` a command raises. In a distributed run
every rank raises the same error; only rank 0 prints it (see `report`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path

COMMANDS = {
    "prepare": ("pipeline.data.ingest", "ingest real images into WebDataset shards with a manifest"),
    "train": ("pipeline.train", "train a DDPM or VAE through DeepSpeed from a YAML config"),
    "sample": ("pipeline.sample", "draw a quick sample grid PNG from a checkpoint or export"),
    "generate": ("pipeline.generate", "generate a synthetic data set into WebDataset shards (sharded, resumable)"),
    "encode": ("pipeline.encode", "encode an image shard set into latent shards through a VAE (sharded, resumable)"),
    "evaluate": ("pipeline.evaluation.cli", "compare a fake shard set with a real one (offline metrics)"),
}
USAGE_ERROR = 2
OTHER_RANK_GRACE_S = 10.0  # how long a rank other than 0 leaves rank 0 to report the same error first


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: PROG: argument --x: ...`), not usage + error."""

    def error(self, message: str):
        report(f"{self.prog}: {message} (see {self.prog} --help)")
        sys.exit(USAGE_ERROR)


def report(message: str) -> None:
    """Print a user error as one line, once per run: rank 0 of a distributed run speaks for all.

    Every rank checks the same config and flags, so rank 0 normally fails the same way; the launcher (torchrun,
    srun) then ends the other ranks. Another rank speaks (naming itself) only if it is still alive after a
    grace period, i.e. its error was its own.
    """
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANK_GRACE_S)
        message = f"(rank {rank}) {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- argument types (checked at parse time)
def count(text: str) -> int:
    """An integer >= 1 (sample counts, sizes, step counts)."""
    return bounded_int(text, 1)


def non_negative(text: str) -> int:
    return bounded_int(text, 0)


def bounded_int(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lo:
        raise argparse.ArgumentTypeError(f"{value} is out of range (allowed: >= {lo})")
    return value


def input_file(text: str) -> Path:
    """A file that exists and can be read (a folder here is named as such, not as missing)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: it may not exist yet, but must not be a file and must be creatable/writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a folder")
    check_writable(text, path if path.exists() else path.parent)
    return path


def output_file(text: str) -> Path:
    """A file to write: not an existing folder, and its folder must be creatable/writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    check_writable(text, path.parent)
    return path


def check_writable(text: str, folder: Path) -> None:
    """`folder` (or, when it does not exist yet, its nearest existing ancestor) must be a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, so no folder can be created under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {existing} (permission denied)")


DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def device(text: str) -> str:
    """A torch device name; whether it exists is checked by `check_device` once torch is imported."""
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (allowed: cpu, cuda, cuda:N)")
    return text


def check_device(flag: str, name: str) -> None:
    """Refuse a device this machine does not have (imports torch: call it from a command's run)."""
    import torch

    from pipeline.errors import PipelineError

    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{flag} {name}: this machine has no CUDA device (allowed: cpu)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise PipelineError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"{flag} {name}: MPS is not available on this machine")


# ---------------------------------------------------------------- dispatch
def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
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
        report(str(exc))
        return USAGE_ERROR
