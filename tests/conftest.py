"""Suite-wide set-up. Triton's interpreter must be chosen before `triton` is first imported (at collection,
by whichever test package imports `kernels` first), so it is decided here, once, for the whole suite."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # tiny tensors: one thread is ~100x faster than two on the 2-core CI machine
