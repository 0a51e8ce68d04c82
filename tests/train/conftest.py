import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
# Small enough that a run of a few dozen steps takes seconds on 2 CPU cores.
FAST = ["model.base_channels=8", "model.attention_resolutions=[4]", "train.micro_batch=16", "train.warmup_steps=2",
        "train.log_every=1", "train.sample_every=0", "train.num_sample_images=4", "diffusion.sample_steps=4",
        "train.ema_warmup_steps=2"]


def train_command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--config", "configs/tiny.yaml", "--out", str(run_dir),
            f"data.shards={shards}", *FAST, *overrides]


def run_training(run_dir: Path, shards: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(run_dir, shards, *overrides), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
