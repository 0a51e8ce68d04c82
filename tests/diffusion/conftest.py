import os
import sys

import torch

# Triton decides interpret mode when `kernels` is first imported, possibly while collecting these tests,
# before tests/kernels/conftest.py runs: decide it here the same way (CPU: interpret).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest.ini uses --import-mode=importlib: make the shared `oracles` helper importable by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # tiny tensors: one thread is 100x faster on the 2-core CI machine
