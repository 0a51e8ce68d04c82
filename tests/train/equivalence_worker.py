"""Train a few steps on FIXED global batches of real digits; each micro-batch takes its slice of every batch.

Run as 1 process or under torchrun with N ranks, with or without gradient accumulation: with the same global
batch the result must be the same, because timesteps and noise are drawn per GLOBAL sample id of the step
(see pipeline/train.py).
Usage: python equivalence_worker.py OUT.pt SHARDS RUN_DIR ZERO_STAGE GLOBAL_BATCH GRAD_ACCUM
"""
import os
import sys
from types import SimpleNamespace

import torch
from sklearn.datasets import load_digits

from pipeline.config import load_config
from pipeline.ema import full_state_dict
from pipeline.train import Trainer, end_distributed
from tests.train.conftest import FAST


def main(out: str, shards: str, run_dir: str, zero_stage: str, global_batch: str, grad_accum: str) -> None:
    world, accum = int(os.environ.get("WORLD_SIZE", 1)), int(grad_accum)
    micro = int(global_batch) // (world * accum)
    config = load_config("configs/tiny.yaml", [*FAST, f"data.shards={shards}", f"train.zero_stage={zero_stage}",
                                               f"train.micro_batch={micro}", f"train.grad_accum={accum}",
                                               "train.steps=5", "train.grad_clip=0.5", "model.dropout=0.0"])
    trainer = Trainer(config, run_dir)
    init = full_state_dict(trainer.engine.module)
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1
    labels = torch.tensor(load_digits().target)
    for step in range(config.train.steps):
        starts = [step * int(global_batch) + (k * world + trainer.rank) * micro for k in range(accum)]
        trainer.train_step([SimpleNamespace(images=digits[lo:lo + micro], labels=labels[lo:lo + micro])
                            for lo in starts])
    ema = trainer.ema.state_dict_full(trainer.engine.module)
    weights = full_state_dict(trainer.engine.module)
    if trainer.rank == 0:
        torch.save({"weights": weights, "ema": ema, "init": init}, out)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        end_distributed()  # as `python -m pipeline train` does: gloo's threads can abort an exit left to them
