"""Dilated / dense attention against the exact loop-based math reference."""

import pytest
import torch

from reference_attention import reference_branch, reference_dilated_attention
from slidessl.models import attention as attention_mod
from slidessl.models.attention import dense_attention, dilated_attention
from slidessl.models.dilated import lse as lse_mod
from slidessl.models.dilated import plan as plan_mod


def _qkv(b, n, h, d, dtype=torch.float64, grad=False):
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=grad) for _ in range(3)]


def _pad_mask(lengths, n):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.fixture(params=["fused", "manual", "bias"])
def backend(request, monkeypatch):
    """Every exact path: per-branch fused LSE kernels, explicit matmuls, one biased SDPA."""
    small = attention_mod.SMALL_N_BIAS_ELEMENTS if request.param == "bias" else 0
    monkeypatch.setattr(attention_mod, "SMALL_N_BIAS_ELEMENTS", small)
    lse_mod.set_backend("manual" if request.param == "manual" else "auto")
    yield request.param
    lse_mod.set_backend("auto")


@pytest.mark.parametrize("n", [1, 9, 64])
def test_one_branch_r1_whole_sequence_equals_dense(n, backend):
    q, k, v = _qkv(2, n, 3, 8)
    pm = _pad_mask([n, max(1, n // 2)], n)
    for w in (n, n + 5, 10_000):
        out = dilated_attention(q, k, v, [w], [1], pm)
        ref = dense_attention(q, k, v, pm)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # a dense path with two branches (second one idle-equal) still matches dense
    both = dilated_attention(q, k, v, [n, 2 * n], [1, 1], pm)
    torch.testing.assert_close(both, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "w,r,h", [(8, 1, 4), (8, 2, 4), (12, 3, 4), (16, 4, 6), (8, 8, 3), (5, 2, 2), (300, 4, 4)]
)
def test_each_branch_against_reference(w, r, h, backend):
    n = 37
    q, k, v = _qkv(2, n, h, 4)
    pm = _pad_mask([n, 23], n)
    ref_out, ref_lse = reference_branch(q, k, v, w, r, pm)
    out = dilated_attention(q, k, v, [w], [r], pm)
    # one branch: covered (position, head) pairs carry the branch output, others zero
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(ref_lse).any()


@pytest.mark.parametrize("n", [1, 7, 1023, 1025, 8193])
def test_lengths_against_reference(n):
    segs, dils = [64, 512, 4096], [1, 2, 4]
    q, k, v = _qkv(1, n, 2, 4)
    out = dilated_attention(q, k, v, segs, dils)
    ref = reference_dilated_attention(q, k, v, segs, dils)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_padding_invariance_in_a_batch(backend):
    lengths = [50, 17, 33]
    n = max(lengths)
    segs, dils = [8, 16, 64], [1, 2, 4]
    q, k, v = _qkv(3, n, 4, 8, dtype=torch.float32)
    pm = _pad_mask(lengths, n)
    # garbage in the padded rows must not leak
    for t in (q, k, v):
        t.data[pm] = 1e3 * torch.randn_like(t.data[pm])
    batched = dilated_attention(q, k, v, segs, dils, pm)
    for i, m in enumerate(lengths):
        alone = dilated_attention(q[i : i + 1, :m], k[i : i + 1, :m], v[i : i + 1, :m], segs, dils)
        torch.testing.assert_close(batched[i, :m], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.all(batched[i, m:] == 0)


def test_gradients_match_reference(backend):
    b, n, h, d = 2, 45, 4, 8
    segs, dils = [8, 16, 64], [1, 2, 4]
    q, k, v = _qkv(b, n, h, d, grad=True)
    pm = _pad_mask([n, 30], n)
    g = torch.randn(b, n, h, d, dtype=torch.float64)
    ref = torch.autograd.grad(
        (reference_dilated_attention(q, k, v, segs, dils, pm) * g).sum(), (q, k, v)
    )
    got = torch.autograd.grad((dilated_attention(q, k, v, segs, dils, pm) * g).sum(), (q, k, v))
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)


def test_multiplicity_bias_counts_branches():
    bias, covered = plan_mod.multiplicity_bias(12, 4, [4, 12], [1, 2], "cpu", torch.float64)
    # head 0 (group 0 of r=2): positions 0 and 2 share segment 0 of branch 1 and the whole
    # sequence's even offsets in branch 2 -> seen twice
    assert bias[0, 0, 2].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert bias[0, 0, 4].item() == 0.0  # only branch 2 (different r=1 segment)
    assert bias[0, 1, 5].item() < -1e3  # odd offsets: head 0 sees them in no branch together
    assert covered.all()


def test_inexact_grad_differs_only_in_backward():
    q, k, v = _qkv(1, 40, 4, 8, grad=True)
    segs, dils = [8, 32], [1, 2]
    exact = dilated_attention(q, k, v, segs, dils)
    approx = dilated_attention(q, k, v, segs, dils, exact_grad=False)
    torch.testing.assert_close(exact, approx)
    ge = torch.autograd.grad(exact.sum(), q)[0]
    ga = torch.autograd.grad(approx.sum(), q)[0]
    assert not torch.allclose(ge, ga)


def test_bf16_autocast_close_to_fp32():
    q, k, v = _qkv(1, 300, 4, 16, dtype=torch.float32)
    segs, dils = [64, 256], [1, 4]
    ref = dilated_attention(q, k, v, segs, dils)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dilated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), segs, dils)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05


def test_bad_branches_raise():
    q, k, v = _qkv(1, 8, 2, 4)
    with pytest.raises(ValueError, match="same length"):
        dilated_attention(q, k, v, [4, 8], [1])
    with pytest.raises(ValueError, match=">= 1"):
        dilated_attention(q, k, v, [0], [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dilated_matches_reference(dtype):
    n, segs, dils = 3000, [256, 1024, 4096], [1, 2, 4]
    q, k, v = _qkv(2, n, 8, 64, dtype=torch.float64, grad=True)
    pm = _pad_mask([n, 2111], n)
    ref = reference_dilated_attention(q, k, v, segs, dils, pm)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    qc, kc, vc = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    out = dilated_attention(qc, kc, vc, segs, dils, pm.cuda())
    grads = torch.autograd.grad((out * g.cuda().to(dtype)).sum(), (qc, kc, vc))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    assert (out.double().cpu() - ref).abs().max() < tol * 5
    for a, e in zip(grads, ref_grads):
        err = (a.double().cpu() - e).norm() / e.norm()
        assert err < tol * 2, err
