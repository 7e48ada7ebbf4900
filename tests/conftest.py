import faulthandler
import os
import sys

import pytest
import torch

# The kernel tests run the Triton kernels themselves; without a GPU they run under Triton's interpreter.
# This must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (still runs in CI)")


# No single test may hang the run: after TEST_TIMEOUT seconds (default 900) every thread's traceback is printed and
# the process exits, so CI fails at once with the place it was stuck instead of running into its time limit.
TEST_TIMEOUT = float(os.environ.get("TEST_TIMEOUT", 900))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
