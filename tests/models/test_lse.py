"""Attention with log-sum-exp: exact gradients through ``out`` and ``lse`` on every path."""

import functools

import pytest
import torch

from slidessl.models.attention import dilated_attention
from slidessl.models.dilated import lse as lse_mod


@pytest.fixture
def lse_grad():
    """Set the LSE-gradient mode for one test and restore the default after it."""
    yield lse_mod.set_lse_grad
    lse_mod.set_lse_grad("auto")


def _math(q, k, v, key_valid):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def _inputs(b=2, h=3, n=29, d=8, dtype=torch.float64, masked=True):
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    key_valid = None
    if masked:
        key_valid = torch.rand(b, 1, 1, n) > 0.3
        key_valid[..., 0] = True  # every row keeps at least one key
    return q, k, v, key_valid


def _grads(fn, q, k, v, w_out, w_lse):
    out, lse = fn()
    loss = (lse.to(w_lse.dtype) * w_lse).sum()
    if w_out is not None:
        loss = loss + (out * w_out).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    return out, lse, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]


@pytest.mark.parametrize("mode", ["kernel", "surrogate"])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_gradients_through_out_and_lse(mode, masked, lse_grad):
    lse_grad(mode)
    q, k, v, kv = _inputs(masked=masked)
    w_out, w_lse = torch.randn_like(q), torch.randn(q.shape[:-1], dtype=q.dtype)
    out, lse, got = _grads(lambda: lse_mod.attention_with_lse(q, k, v, kv), q, k, v, w_out, w_lse)
    ref_out, ref_lse, ref = _grads(lambda: _math(q, k, v, kv), q, k, v, w_out, w_lse)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_kernel_backward_exact_where_the_output_gradient_is_zero(lse_grad):
    """Rows with dL/dout = 0 but dL/dlse != 0 cannot carry the correction in ``out``; the
    extra-head-dimension path handles them, also when only the LSE is used at all."""
    lse_grad("kernel")
    q, k, v, kv = _inputs()
    w_out = torch.randn_like(q)
    w_out[0, 1, :5] = 0.0  # five rows of one head: no gradient through out
    w_lse = torch.randn(q.shape[:-1], dtype=q.dtype)
    for wo in (w_out, None):
        *_, got = _grads(lambda: lse_mod.attention_with_lse(q, k, v, kv), q, k, v, wo, w_lse)
        *_, ref = _grads(lambda: _math(q, k, v, kv), q, k, v, wo, w_lse)
        for a, e in zip(got, ref):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_kernel_backward_float32_and_bf16_close_to_float64(lse_grad):
    lse_grad("kernel")
    q, k, v, kv = _inputs(n=200, d=16)
    w_out, w_lse = torch.randn_like(q), torch.randn(q.shape[:-1], dtype=q.dtype)
    *_, ref = _grads(lambda: _math(q, k, v, kv), q, k, v, w_out, w_lse)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        fn = functools.partial(lse_mod.attention_with_lse, ql, kl, vl, kv)
        *_, got = _grads(fn, ql, kl, vl, w_out.to(dtype), w_lse)
        for a, e in zip(got, ref):
            assert ((a.double() - e).norm() / e.norm()).item() < tol


def _flash_calls(mode, lse_grad):
    lse_grad(mode)
    assert lse_mod.private_kernels_ok("cpu")  # the one-time check runs outside the profile
    q, k, v = (torch.randn(1, 300, 4, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = dilated_attention(q, k, v, [64, 256], [1, 2])
        out.sum().backward()
    names = [e.key for e in prof.key_averages() for _ in range(e.count)]
    fwd = names.count("aten::_scaled_dot_product_flash_attention_for_cpu")
    bwd = names.count("aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    return fwd, bwd


def test_kernel_mode_needs_no_extra_attention_call(lse_grad, monkeypatch):
    """Kernel mode: one forward and one backward kernel per segment length; the surrogate
    needs a second forward (and its backward) per length."""
    from slidessl.models import attention as attention_mod
    from slidessl.models.dilated import plan as plan_mod

    monkeypatch.setattr(attention_mod, "SMALL_N_BIAS_ELEMENTS", 0)
    # 300 tokens: branch 64 -> 4 segments of 64 + a partial one of 44, branch 256 (r = 2)
    # -> 128 + 22 sparse rows; the 22 are padded into the 44 (a small share of the work):
    # three lengths, 44, 64 and 128
    assert [c[0] for c in plan_mod.padded_plan(1, 300, 4, [64, 256], [1, 2], "cpu").classes] == [
        44,
        64,
        128,
    ]
    assert _flash_calls("kernel", lse_grad) == (3, 3)
    assert _flash_calls("surrogate", lse_grad) == (6, 6)


def test_unknown_lse_grad_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown LSE gradient mode"):
        lse_mod.set_lse_grad("approximate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["kernel", "surrogate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_lse_gradients_match_math(mode, dtype, masked, lse_grad):
    """Flash (no mask, half precision) and memory-efficient (mask or float32) kernels."""
    lse_grad(mode)
    q, k, v, kv = _inputs(b=2, h=4, n=333, d=48, masked=masked)
    w_out, w_lse = torch.randn_like(q), torch.randn(q.shape[:-1], dtype=q.dtype)
    w_out[0, 1, :5] = 0.0
    *_, ref = _grads(lambda: _math(q, k, v, kv), q, k, v, w_out, w_lse)
    qc, kc, vc = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    kvc = None if kv is None else kv.cuda()
    *_, got = _grads(
        lambda: lse_mod.attention_with_lse(qc, kc, vc, kvc),
        qc,
        kc,
        vc,
        w_out.cuda().to(dtype),
        w_lse.cuda(),
    )
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for a, e in zip(got, ref):
        assert ((a.double().cpu() - e).norm() / e.norm()).item() < tol


def test_a_changed_private_kernel_falls_back_to_the_public_path(rng, monkeypatch):
    """A torch whose private attention kernels changed signature (TypeError) gets one
    warning and the public path, with the same outputs, LSE and exact gradients."""
    from slidessl.models.dilated import lse as mod

    def changed(*args, **kwargs):
        raise TypeError("_scaled_dot_product_flash_attention_for_cpu() got an unexpected arg")

    monkeypatch.setattr(mod, "_PRIVATE_OK", {})
    monkeypatch.setattr(mod, "_kernel_forward", changed)
    monkeypatch.setattr(mod, "_PUBLIC_LSE_CHUNK", 5)  # several query chunks
    q, k, v = (
        torch.from_numpy(rng.standard_normal((2, 3, 13, 8))).requires_grad_() for _ in range(3)
    )
    valid = torch.from_numpy(rng.random((2, 1, 1, 13)) < 0.8)
    valid[..., 0] = True
    with pytest.warns(RuntimeWarning, match="public scaled_dot_product_attention"):
        out, lse = mod.attention_with_lse(q, k, v, valid)
    assert mod._PRIVATE_OK == {"cpu": False}
    g = torch.autograd.grad((out * 1.3).sum() + (lse * 0.7).sum(), (q, k, v))
    ref_out, ref_lse = mod._manual(q, k, v, valid, 8**-0.5)
    ref = torch.autograd.grad((ref_out * 1.3).sum() + (ref_lse * 0.7).sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning
        mod.attention_with_lse(q, k, v, valid)


def test_private_kernels_pass_their_check_on_this_torch():
    from slidessl.models.dilated import lse as mod

    mod._PRIVATE_OK.pop("cpu", None)
    assert mod.private_kernels_ok("cpu")


def test_private_kernel_check_is_not_fooled_by_autocast(monkeypatch):
    """The one-time check runs in float32 even when the first attention call of the
    process runs under bf16 autocast (a bf16 check would differ from the float32 math and
    route every later call, bf16 or not, to the slow public path)."""
    import warnings

    from slidessl.models.dilated import lse as mod

    monkeypatch.setattr(mod, "_PRIVATE_OK", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warning would fail the test
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert mod.private_kernels_ok("cpu")
