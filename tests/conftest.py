import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# the project (import main, models, ...) and the shared test helpers (e2e_utils, vit_utils,
# toy_family) for the tests in unit/, e2e/ and reliability/
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# Unit tests use tiny tensors: one intra-op thread avoids OpenMP spin-up costs that
# dominate at this size (and thrash when the machine is shared). End-to-end tests run
# in subprocesses with their own OMP_NUM_THREADS.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared is not beside the project")
    return SHARED
