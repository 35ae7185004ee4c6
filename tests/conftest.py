import os

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker gets one intra-op thread, so two workers share two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def rng():
    """A fresh, seeded-per-test numpy generator (seed printed on failure via the test id)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
