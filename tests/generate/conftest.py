"""Real trained tiny models (unconditional and class-conditional) for the generation tests, once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The smallest model that trains in seconds on 2 CPU cores (a real DeepSpeed run that writes a real export).
OVERRIDES = ["model.base_channels=8", "train.micro_batch=16", "train.steps=30",
         "train.sample_every=0", "train.log_every=10", "diffusion.sample_steps=4"]


def run_module(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    run_module("pipeline", "prepare", "--source", "digits", "--out", str(out), "--no-progress")
    return out


def train(run_dir: Path, shards: Path, *overrides: str) -> Path:
    run_module("pipeline", "train", "--config", "configs/tiny.yaml", "--out", str(run_dir), f"data.shards={shards}",
               *OVERRIDES, *overrides)
    return run_dir


@pytest.fixture(scope="session")
def uncond_run(tmp_path_factory, digits_shards) -> Path:
    """A run folder; its export/latest.safetensors holds the EMA weights."""
    return train(tmp_path_factory.mktemp("uncond") / "run", digits_shards)


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory, digits_shards) -> Path:
    return train(tmp_path_factory.mktemp("cond") / "run", digits_shards, "model.num_classes=10")
