import os
import sys

import torch

# pytest.ini uses --import-mode=importlib: make the shared `oracles` helper importable by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # tiny tensors: one thread is 100x faster on the 2-core CI machine
