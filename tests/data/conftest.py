import numpy as np
import pytest
from sklearn.datasets import load_digits

from pipeline.data.ingest import prepare


@pytest.fixture(scope="session")
def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real digits mapped to uint8 by integer arithmetic: (v*255 + 8) // 16 == floor(v*255/16 + 1/2)."""
    digits = load_digits()
    values = digits.images.astype(np.int64)
    return ((values * 255 + 8) // 16).astype(np.uint8), digits.target.astype(np.int64)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The real digits in 9 shards of 200 (the last one 197): more shards than 2 ranks x 2 workers."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("digits", out, shard_size=200, progress=False)
    return out
