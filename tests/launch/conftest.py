import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEP_WORKER = REPO / "tests" / "launch" / "step_worker.py"
# A tiny DDPM on 8x8 digits: a 2-task run of a few dozen steps takes ~30 s on 2 CPU cores.
TINY = ["model.base_channels=8", "train.micro_batch=16", "train.warmup_steps=2", "train.log_every=1",
        "train.sample_every=0", "train.num_sample_images=4", "diffusion.sample_steps=4", "train.ema_warmup_steps=2"]


def train_args(run: Path, shards: Path, *overrides: str) -> list[str]:
    """`python -m pipeline train` arguments (after the launcher's `--`) for the tiny model."""
    return ["--config", "configs/tiny.yaml", "--out", str(run), f"data.shards={shards}", *TINY, *overrides]


def job_env() -> dict[str, str]:
    """What the jobs inherit: one thread per task (2 cores), DeepSpeed's compiled comm op cached in the checkout."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}


def run_launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True,
                          env=job_env(), timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local test cluster (tests/slurm/start.sh). Skipped without `sbatch` outside CI; in CI (CI set) a
    missing or broken cluster fails loudly, so the SLURM tests can never be skipped silently there."""
    in_ci = bool(os.environ.get("CI"))
    if shutil.which("sbatch") is None:
        if in_ci:
            pytest.fail("CI is set but `sbatch` is not on PATH: run `bash tests/slurm/start.sh` before the tests")
        pytest.skip("no SLURM here (`sbatch` not on PATH); start one with `bash tests/slurm/start.sh` (root)")
    probe = subprocess.run(["srun", "-N1", "-n1", "-t", "1", "true"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"`sbatch` exists but `srun true` fails ({probe.stderr.strip()}): is the cluster up? "
                    "(bash tests/slurm/start.sh)")
