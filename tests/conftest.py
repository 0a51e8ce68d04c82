"""Suite-wide set-up. Triton's interpreter must be chosen before `triton` is first imported (at collection,
by whichever test package imports `kernels` first), so it is decided here, once, for the whole suite."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))  # as scripts/test.sh, demo.sh
torch.set_num_threads(1)  # tiny tensors: one thread is ~100x faster than two on the 2-core CI machine


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The real 8x8 digits as shards (6 shards of <= 300, enough for 2 ranks x 2 workers), once per session."""
    out = tmp_path_factory.mktemp("data") / "digits"
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", "digits", "--out", str(out),
                    "--shard-size", "300", "--no-progress"], check=True, cwd=REPO, capture_output=True)
    return out
