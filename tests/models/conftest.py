
import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: one thread is 100x faster on the 2-core CI machine


@pytest.fixture(scope="session")
def digits():
    """sklearn's real 8x8 digits scaled to [-1, 1], (1797, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0 * 2 - 1
    return torch.from_numpy(images).unsqueeze(1)
