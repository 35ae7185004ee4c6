"""The packed layout of dilated attention: segments, the row plan, the autograd graph."""

import pytest
import torch

from reference_attention import reference_dilated_attention
from slidessl.models import attention as attention_mod
from slidessl.models.attention import branch_layout, dilated_attention


@pytest.fixture(autouse=True)
def no_bias_path(monkeypatch):
    """Force the per-branch path even at toy sizes."""
    monkeypatch.setattr(attention_mod, "SMALL_N_BIAS_ELEMENTS", 0)


def test_branch_layout_pads_to_whole_segments():
    assert branch_layout(8193, 16, 1024, 1) == (9, 1024, 1024)
    assert branch_layout(8193, 16, 65536, 16) == (1, 8193, 8208)
    assert branch_layout(37, 4, 5, 2) == (8, 5, 6)
    assert branch_layout(12, 4, 12, 3) == (1, 12, 12)


def test_pieces_split_off_the_partial_segment():
    assert attention_mod._pieces(8193, 1024) == [(0, 8192, 1024), (8192, 8193, 1)]
    assert attention_mod._pieces(8193, 65536) == [(0, 8193, 8193)]
    assert attention_mod._pieces(2048, 1024) == [(0, 2048, 1024)]
    # the attention work counted for the CLS length drops to the partial segment's own size
    full = attention_mod.attention_flops(8192, 4, [1024], [1])
    assert attention_mod.attention_flops(8193, 4, [1024], [1]) == full + 4.0 * 4


@pytest.mark.parametrize("n,h,segs,dils", [(257, 4, [32, 128, 512], [1, 2, 4]), (37, 6, [5], [2])])
def test_plan_rows_cover_each_branch_once(n, h, segs, dils):
    """Every (position, head) that a branch keeps is one real row of the plan, read from
    and added back to that position; no branch refers to a padding row."""
    plan = attention_mod._plan(2, n, h, segs, dils, "cpu")
    rows = plan.gather.numel()
    assert plan.valid.numel() == rows
    per = plan.rows_of.view(2 * n * h, len(segs))
    used = per[per != plan.sentinel]
    assert plan.valid[used].all() and len(used.unique()) == len(used) == int(plan.valid.sum())
    for i, (w, r) in enumerate(zip(segs, dils)):
        group = torch.arange(h) // -(-h // r)
        for p in (0, 1, n - 1):
            start = (p // min(w, n)) * min(w, n)
            kept = (p - start) % r == group  # (H,): heads of this branch that see p
            for head in range(h):
                row = per[p * h + head, i].item()
                assert (row != plan.sentinel) == bool(kept[head]), (p, head, i)
                if row != plan.sentinel:
                    assert plan.gather[row] == p * h + head


def test_plan_is_cached():
    a = attention_mod._plan(1, 100, 4, [16, 64], [1, 2], "cpu")
    assert attention_mod._plan(1, 100, 4, [16, 64], [1, 2], "cpu") is a


def _graph_ops(tensor):
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("n,h", [(256, 4), (257, 4), (257, 6)])
def test_no_sort_based_indexing_and_exact(n, h):
    """Whole segments (views, no mask), the CLS length N + 1 (padded, masked) and heads not
    splitting evenly into groups all match the float64 reference, and the autograd graph has
    no advanced indexing / index_put (sort-based kernels on CUDA)."""
    segs, dils = [32, 128, 512], [1, 2, 4]
    q, k, v = (torch.randn(1, n, h, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = dilated_attention(q, k, v, segs, dils)
    ops = _graph_ops(out)
    assert not {"IndexBackward0", "IndexPutBackward0", "ScatterAddBackward0"} & ops, ops
    ref = reference_dilated_attention(q, k, v, segs, dils)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)
