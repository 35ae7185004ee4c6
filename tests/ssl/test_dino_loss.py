import pytest
import torch

from slidessl.ssl.dino_loss import DINOLoss


def test_forward_is_the_cross_entropy_over_all_pairs():
    loss_fn = DINOLoss(20, student_temp=0.2)
    s = [torch.randn(5, 20) for _ in range(3)]
    t = [torch.softmax(torch.randn(5, 20), -1) for _ in range(2)]
    expected = sum(-(tj * torch.log_softmax(si / 0.2, -1)).sum(-1).mean() for si in s for tj in t)
    torch.testing.assert_close(loss_fn(s, t), expected)


def test_loss_is_smallest_when_student_agrees_with_teacher():
    loss_fn = DINOLoss(10, student_temp=1.0)
    t = torch.softmax(torch.randn(4, 10), -1)
    agree = loss_fn([t.log()], [t])
    other = loss_fn([torch.randn(4, 10)], [t])
    assert agree < other
    # at agreement the loss is the teacher entropy
    torch.testing.assert_close(agree, -(t * t.log()).sum(-1).mean())


def test_centering_and_sharpening():
    loss_fn = DINOLoss(8)
    t = torch.randn(6, 8)
    p = loss_fn.softmax_center_teacher(t, 0.04)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    torch.testing.assert_close(p, torch.softmax(t / 0.04, -1))  # centre starts at zero
    loss_fn.center.fill_(0.5)
    torch.testing.assert_close(loss_fn.softmax_center_teacher(t, 0.04), p)  # shift-invariant
    assert loss_fn.softmax_center_teacher(t, 0.01).max(-1).values.mean() > p.max(-1).values.mean()


def test_pending_center_update_is_an_ema_of_the_step_mean():
    loss_fn = DINOLoss(12, center_momentum=0.7)
    a, b = torch.randn(4, 12), torch.randn(10, 12)
    loss_fn.accumulate_center(a)
    loss_fn.accumulate_center(b)
    torch.testing.assert_close(loss_fn.center, torch.zeros(1, 12))  # nothing moves yet
    assert loss_fn.pending_count == 14
    loss_fn.apply_center_update()
    mean = torch.cat([a, b]).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, 0.3 * mean)
    loss_fn.apply_center_update()  # nothing pending: unchanged
    torch.testing.assert_close(loss_fn.center, 0.3 * mean)
    c = torch.randn(3, 12)
    loss_fn.accumulate_center(c)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.7 * 0.3 * mean + 0.3 * c.mean(0, keepdim=True))


def test_micro_batches_equal_one_large_batch():
    big, small = DINOLoss(16), DINOLoss(16)
    t = torch.randn(12, 16)
    big.accumulate_center(t)
    for chunk in t.chunk(4):
        small.accumulate_center(chunk)
    big.apply_center_update()
    small.apply_center_update()
    torch.testing.assert_close(big.center, small.center)


def test_center_is_saved_with_the_state():
    loss_fn = DINOLoss(5)
    loss_fn.accumulate_center(torch.randn(3, 5))
    loss_fn.apply_center_update()
    other = DINOLoss(5)
    other.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(other.center, loss_fn.center)


def test_sinkhorn_teacher_rows_are_distributions():
    loss_fn = DINOLoss(30)
    q = loss_fn.sinkhorn_knopp_teacher(torch.randn(9, 30), 0.05)
    assert q.shape == (9, 30)
    torch.testing.assert_close(q.sum(-1), torch.ones(9))


def test_errors_are_clear():
    loss_fn = DINOLoss(8)
    with pytest.raises(ValueError, match="out_dim 8"):
        loss_fn.accumulate_center(torch.randn(2, 9))
    with pytest.raises(ValueError, match="teacher shape"):
        loss_fn([torch.randn(2, 8)], [torch.rand(3, 8)])
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn.softmax_center_teacher(torch.randn(2, 8), 0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(8, center_momentum=1.5)
