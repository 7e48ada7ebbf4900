import os
import sys

import torch

# The kernel tests run the Triton kernels themselves; without a GPU they run under Triton's interpreter.
# This must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (still runs in CI)")
