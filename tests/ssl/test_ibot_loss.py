import numpy as np
import pytest
import torch

from slidessl.ssl.ibot_loss import iBOTPatchLoss


def test_masked_form_equals_dense_form():
    b, n, k = 4, 9, 16
    loss_fn = iBOTPatchLoss(k, student_temp=0.1)
    masks = torch.rand(b, n) < 0.4
    masks[1] = False
    masks[2, 0] = True
    s = torch.randn(b, n, k)
    t = torch.softmax(torch.randn(b, n, k) / 0.05, -1)
    dense = loss_fn(s, t, masks)
    packed = loss_fn.forward_masked(s[masks], t[masks], masks)
    torch.testing.assert_close(packed, dense)


def test_per_sample_weighting():
    k = 8
    loss_fn = iBOTPatchLoss(k, student_temp=1.0)
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, :1] = True
    masks[1, :4] = True  # sample 2 has no masked token but counts in the batch of three
    s, t = torch.randn(5, k), torch.softmax(torch.randn(5, k), -1)
    ce = -(t * torch.log_softmax(s, -1)).sum(-1)
    expected = (ce[0] + ce[1:].mean()) / 3
    torch.testing.assert_close(loss_fn.forward_masked(s, t, masks), expected)
    weights = torch.full((5,), 0.5)
    torch.testing.assert_close(
        loss_fn.forward_masked(s, t, masks, masks_weight=weights), 0.5 * ce.sum() / 3
    )


def test_centre_api_is_shared_with_dino():
    loss_fn = iBOTPatchLoss(6, center_momentum=0.5)
    t = torch.randn(2, 4, 6)  # any leading shape
    loss_fn.accumulate_center(t)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.5 * t.reshape(-1, 6).mean(0, keepdim=True))
    p = loss_fn.sinkhorn_knopp_teacher(t.reshape(-1, 6), 0.1)
    torch.testing.assert_close(p.sum(-1), torch.ones(8))


def test_errors():
    loss_fn = iBOTPatchLoss(6)
    masks = torch.zeros(2, 3, dtype=torch.bool)
    masks[0, 0] = True
    with pytest.raises(ValueError, match="2 masked logits but masks hold 1"):
        loss_fn.forward_masked(torch.randn(2, 6), torch.rand(2, 6), masks)
    with pytest.raises(ValueError, match="bool"):
        loss_fn.forward_masked(torch.randn(1, 6), torch.rand(1, 6), masks.float())


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_head_loss_equals_unchunked_in_value_and_gradients(rng, chunk):
    """forward_head_masked (head + log-softmax per chunk, checkpointed) gives the loss and
    the gradients of head(tokens) followed by forward_masked."""
    from slidessl.ssl.heads import DINOHead

    k = 24
    loss_fn = iBOTPatchLoss(k, student_temp=0.1)
    masks = torch.from_numpy(rng.random((3, 6)) < 0.5)
    masks[0, :2] = True
    m = int(masks.sum())
    torch.manual_seed(int(rng.integers(2**31)))
    head = DINOHead(10, k, hidden_dim=12, bottleneck_dim=5).double()  # float64: exact sums
    x = torch.from_numpy(rng.standard_normal((m, 10))).requires_grad_()
    t = torch.softmax(torch.from_numpy(rng.standard_normal((m, k))), -1)
    ref = loss_fn.forward_masked(head(x), t, masks)
    ref_grads = torch.autograd.grad(ref, [x, *head.parameters()])
    out = loss_fn.forward_head_masked(head, x, t, masks, chunk=chunk)
    grads = torch.autograd.grad(out, [x, *head.parameters()])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_head_in_chunks_matches_one_call(rng):
    from slidessl.ssl.heads import DINOHead
    from slidessl.ssl.ibot_loss import head_in_chunks

    head = DINOHead(6, 16, hidden_dim=8, bottleneck_dim=4)
    x = torch.from_numpy(rng.standard_normal((11, 6)).astype(np.float32))
    torch.testing.assert_close(head_in_chunks(head, x, 4), head(x))
    assert not head_in_chunks(head, x, 4).requires_grad
