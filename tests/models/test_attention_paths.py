"""The packed layout of dilated attention: segments, the row plan, the autograd graph."""

import pytest
import torch

from reference_attention import reference_dilated_attention
from slidessl.models import attention as attention_mod
from slidessl.models.attention import dilated_attention
from slidessl.models.dilated import plan as plan_mod
from slidessl.models.dilated.plan import branch_layout


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
    assert plan_mod._pieces(8193, 1024) == [(0, 8192, 1024), (8192, 8193, 1)]
    assert plan_mod._pieces(8193, 65536) == [(0, 8193, 8193)]
    assert plan_mod._pieces(2048, 1024) == [(0, 2048, 1024)]
    # the attention work counted for the CLS length drops to the partial segment's own size
    full = plan_mod.attention_flops(8192, 4, [1024], [1])
    assert plan_mod.attention_flops(8193, 4, [1024], [1]) == full + 4.0 * 4


@pytest.mark.parametrize("n,h,segs,dils", [(257, 4, [32, 128, 512], [1, 2, 4]), (37, 6, [5], [2])])
def test_plan_rows_cover_each_branch_once(n, h, segs, dils):
    """Every (position, head) that a branch keeps is one real row of the plan, read from
    and added back to that position; no branch refers to a padding row."""
    plan = plan_mod.padded_plan(2, n, h, segs, dils, "cpu")
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
    a = plan_mod.padded_plan(1, 100, 4, [16, 64], [1, 2], "cpu")
    assert plan_mod.padded_plan(1, 100, 4, [16, 64], [1, 2], "cpu") is a


def _assert_reference(out, q, k, v, segs, dils, atol):
    """``out`` and the gradients of q, k, v through it equal the float64 reference's."""
    ref = reference_dilated_attention(q, k, v, segs, dils)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=atol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=atol)


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
    _assert_reference(out, q, k, v, segs, dils, atol=1e-9)


@pytest.mark.parametrize("exact_grad", [True, False])
@pytest.mark.parametrize(
    "lengths,h,segs,dils",
    [
        ((37, 100, 5, 64, 1), 4, [16, 64], [1, 2]),
        ((257, 129, 33), 6, [32, 128, 512], [1, 2, 4]),
        ((8, 8, 8), 4, [8], [1]),
    ],
)
def test_varlen_stream_equals_each_sequence_alone(rng, lengths, h, segs, dils, exact_grad):
    """Several sequences back to back in one (1, T) stream: each one's output and the
    gradients of q, k and v equal those of the sequence run alone (float64), with one
    attention plan for the whole stream."""
    d = 8
    t = sum(lengths)
    qkv = torch.randn(1, t, h, 3, d, dtype=torch.float64, requires_grad=True)
    out = attention_mod.dilated_attention_qkv(
        qkv, segs, dils, exact_grad=exact_grad, lengths=lengths
    )
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), qkv)
    start = 0
    for n in lengths:
        part = qkv[:, start : start + n].detach().requires_grad_(True)
        alone = attention_mod.dilated_attention_qkv(part, segs, dils, exact_grad=exact_grad)
        torch.testing.assert_close(out[:, start : start + n], alone, rtol=1e-9, atol=1e-10)
        (exp,) = torch.autograd.grad((alone * g[:, start : start + n]).sum(), part)
        torch.testing.assert_close(grad[:, start : start + n], exp, rtol=1e-8, atol=1e-10)
        start += n
    if exact_grad:  # and the float64 reference, sequence by sequence
        q, k, v = qkv.detach().unbind(3)
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            ref = reference_dilated_attention(q[:, sl], k[:, sl], v[:, sl], segs, dils)
            torch.testing.assert_close(out[:, sl], ref, rtol=1e-9, atol=1e-10)
            start += n


def test_varlen_plan_shares_one_call_per_segment_length():
    """Two sequences of the same length run in the classes of one: the kernel calls per
    layer do not grow with the number of crops."""
    one = plan_mod.varlen_plan((300,), 4, [64, 256], [1, 2], "cpu")
    many = plan_mod.varlen_plan((300,) * 5 + (300,), 4, [64, 256], [1, 2], "cpu")
    assert [c[0] for c in many.classes] == [c[0] for c in one.classes]
    assert [c[1] for c in many.classes] == [6 * c[1] for c in one.classes]


@pytest.mark.parametrize(
    "lengths,shape,mask",
    [((3, 4), (1, 8), None), ((0, 7), (1, 7), None), ((3, 4), (2, 7), None), ((7,), (1, 7), "m")],
)
def test_varlen_rejects_bad_layouts(lengths, shape, mask):
    qkv = torch.randn(*shape, 2, 3, 4)
    pm = None if mask is None else torch.zeros(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="varlen attention"):
        attention_mod.dilated_attention_qkv(qkv, [4], [1], padding_mask=pm, lengths=lengths)


@pytest.mark.parametrize(
    "n,h,segs,dils",
    [
        (100, 4, [7, 100], [1, 1]),  # every slot filled, padding rows: an appended zero weight
        (37, 4, [16, 64], [2, 4]),  # (token, head) pairs no branch sees: output 0
        (200, 6, [8, 64], [2, 3]),
    ],
)
def test_combine_edge_layouts_match_reference(rng, n, h, segs, dils):
    """The packed combine's backward (each block's kernel given the combined output) is
    exact where padding rows have no empty weight slot to read and where some positions
    are seen by no branch (float64 reference, values and gradients)."""
    plan = plan_mod.padded_plan(1, n, h, segs, dils, "cpu")
    assert plan.pad_weight or not plan.covered
    q, k, v = (torch.randn(1, n, h, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _assert_reference(dilated_attention(q, k, v, segs, dils), q, k, v, segs, dils, atol=1e-10)
