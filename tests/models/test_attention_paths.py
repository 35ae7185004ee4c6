"""The strided-view layout of dilated attention: padding, sparse rows, autograd graph."""

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


@pytest.mark.parametrize("h,r", [(4, 1), (8, 4), (6, 4), (3, 8), (2, 2)])
def test_sparse_rows_pick_each_heads_offsets(h, r):
    b, s, rows, d = 2, 3, 5, 4
    x = torch.randn(b, s, rows * r, h, d)
    group = torch.arange(h) // -(-h // r)
    got = attention_mod._sparse_rows(x, r, group).view(b, s, h, rows, d)
    for head in range(h):
        offsets = group[head].item() + r * torch.arange(rows)
        torch.testing.assert_close(got[:, :, head], x[:, :, offsets, head], rtol=0, atol=0)


def test_pad_unpad_round_trip():
    x = torch.randn(2, 37, 3, 4)
    n_seg, w, w_pad = branch_layout(37, 3, 5, 2)
    padded = attention_mod._pad_segments(x, n_seg, w, w_pad)
    assert padded.shape == (2, n_seg, w_pad, 3, 4)
    assert torch.all(padded[:, :, w:] == 0)
    torch.testing.assert_close(attention_mod._unpad_segments(padded, 37, w), x)


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
