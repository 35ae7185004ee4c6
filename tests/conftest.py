import os
import zlib

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker gets one intra-op thread, so two workers share two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def seed_for(nodeid: str) -> int:
    """The seed of a test: derived from its id, so a failure replays exactly."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request):
    """A numpy generator seeded from the test id (printed: shown with a failure's output).
    The torch global RNG is seeded from the same value."""
    seed = seed_for(request.node.nodeid)
    print(f"rng seed {seed} ({request.node.nodeid})")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
