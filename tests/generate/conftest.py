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


def train(run_dir: Path, shards: Path, *overrides: str) -> Path:
    run_module("pipeline", "train", "--config", "configs/tiny.yaml", "--out", str(run_dir), f"data.shards={shards}",
               *OVERRIDES, *overrides)
    return run_dir


def trained(env_var: str, tmp_path_factory, request, *overrides: str) -> Path:
    """A run folder trained now, or one trained the same way before and named by `env_var` (for a machine
    without DeepSpeed, such as a bare GPU node)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    shards = request.getfixturevalue("digits_shards")
    return train(tmp_path_factory.mktemp("run") / "run", shards, *overrides)


@pytest.fixture(scope="session")
def uncond_run(tmp_path_factory, request) -> Path:
    """A run folder; its export/latest.safetensors holds the EMA weights."""
    return trained("GENERATE_TEST_UNCOND_RUN", tmp_path_factory, request)


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory, request) -> Path:
    return trained("GENERATE_TEST_COND_RUN", tmp_path_factory, request, "model.num_classes=10")
