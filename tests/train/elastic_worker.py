"""`python -m pipeline train` (the same Trainer.fit), recording the sample keys of every micro-batch it trains on
and, at the end, the full raw weights. Run as 1 process or under torchrun.
Usage: python elastic_worker.py RECORD_PREFIX <train arguments>
Writes RECORD_PREFIX.rank<r>.json ({"world", "rank", "steps": {step: [keys of each micro-batch]}}) and, from rank 0,
the raw weights at the start (after any resume) and at the end: RECORD_PREFIX.start.pt, RECORD_PREFIX.weights.pt.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.ema import full_state_dict
from pipeline.train import Trainer, add_arguments, end_distributed


def main(prefix: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    trainer = Trainer(load_config(args.config, args.overrides), Path(args.out), resume=args.resume)
    start = full_state_dict(trainer.engine.module)  # collective under ZeRO-3
    if trainer.rank == 0:
        torch.save(start, f"{prefix}.start.pt")
    steps, train_step = {}, trainer.train_step

    def recording(micro_batches):
        steps[trainer.step + 1] = [batch.keys for batch in micro_batches]
        return train_step(micro_batches)

    trainer.train_step = recording
    code = trainer.fit()
    weights = full_state_dict(trainer.engine.module)  # collective under ZeRO-3
    Path(f"{prefix}.rank{trainer.rank}.json").write_text(
        json.dumps({"world": trainer.world, "rank": trainer.rank, "steps": steps}))
    if trainer.rank == 0:
        torch.save(weights, f"{prefix}.weights.pt")
    return code


if __name__ == "__main__":
    try:
        code = main(sys.argv[1], sys.argv[2:])
    finally:
        end_distributed()  # as `python -m pipeline train` does: one CI run's rank aborted at exit without it
    sys.exit(code)
