import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slidessl.ssl.dino_loss import DINOLoss
from slidessl.ssl.sinkhorn import sinkhorn_knopp


def test_rows_are_assignments_and_prototypes_equipartitioned():
    b, k = 64, 16
    q = sinkhorn_knopp(torch.randn(b, k), 0.5, n_iterations=100)
    torch.testing.assert_close(q.sum(-1), torch.ones(b))
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), atol=1e-3, rtol=1e-3)


def test_invariant_to_a_shift_and_finite_for_huge_logits():
    t = torch.randn(10, 12)
    # a shift of 800 in log space costs float32 about 800 * 6e-8 = 5e-5 of precision
    torch.testing.assert_close(
        sinkhorn_knopp(t + 40.0, 0.05), sinkhorn_knopp(t, 0.05), atol=2e-4, rtol=2e-4
    )
    q = sinkhorn_knopp(t * 1e3, 0.01)  # exp() of these overflows / underflows in float32
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(10))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.randn(3, 4, 5), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.randn(3, 4), 0.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, rows, logits, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lo, hi = rows[rank], rows[rank + 1]
        q = sinkhorn_knopp(logits[lo:hi], 0.1, n_iterations=5)
        loss_fn = DINOLoss(logits.shape[1], center_momentum=0.5)
        loss_fn.accumulate_center(logits[lo:hi])
        loss_fn.apply_center_update()
        result[lo:hi] = q
        if rank == 0:
            result[-1] = loss_fn.center[0]
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_global_batch():
    """Unequal shards (5 and 9 rows, as for masked iBOT tokens) over gloo == the full batch."""
    logits = torch.randn(14, 6)
    rows = [0, 5, 14]
    result = torch.zeros(15, 6).share_memory_()
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method (spawn re-imports torch: too slow here)")
    mp.start_processes(
        _worker, args=(2, _free_port(), rows, logits, result), nprocs=2, start_method="fork"
    )
    torch.testing.assert_close(result[:14], sinkhorn_knopp(logits, 0.1, n_iterations=5))
    torch.testing.assert_close(result[-1], 0.5 * logits.mean(0))
