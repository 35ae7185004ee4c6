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
