import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Eval tests use small tensors: one intra-op thread is faster and avoids oversubscribing
    the two shared cores (restored afterwards for other test folders)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
