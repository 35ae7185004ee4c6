"""Our heads and losses against DINOv2's own code (``pip install --no-deps dinov2==0.0.1.dev2``).

Skipped when the package is absent; it is never a runtime dependency.
"""

import pytest
import torch
import torch.distributed as dist

from slidessl.ssl import DINOHead, DINOLoss, KoLeoLoss, iBOTPatchLoss

ref_loss = pytest.importorskip("dinov2.loss")
pytestmark = pytest.mark.reference

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _logits(*shape):
    return torch.randn(*shape) * 3


def test_dino_loss_matches_dinov2():
    k = 64
    ours, ref = DINOLoss(k, student_temp=0.1, center_momentum=0.8), ref_loss.DINOLoss(k, 0.1, 0.8)
    for _ in range(3):  # three steps: the centre moves
        t = _logits(16, k)
        torch.testing.assert_close(
            ours.softmax_center_teacher(t, 0.05), ref.softmax_center_teacher(t, 0.05), **TOL
        )
        ours.accumulate_center(t)
        ref.update_center(t)
        ours.apply_center_update()
        ref.apply_center_update()
        torch.testing.assert_close(ours.center, ref.center, **TOL)
    s = [_logits(16, k) for _ in range(3)]
    tp = [ours.softmax_center_teacher(_logits(16, k), 0.04) for _ in range(2)]
    torch.testing.assert_close(ours(s, tp), ref(s, tp), **TOL)
    t = torch.randn(16, k)  # DINOv2 does not subtract the maximum: keep exp() finite for it
    torch.testing.assert_close(
        ours.sinkhorn_knopp_teacher(t, 0.05, 3), ref.sinkhorn_knopp_teacher(t, 0.05, 3), **TOL
    )


def test_ibot_loss_matches_dinov2(monkeypatch):
    k, b, n = 48, 6, 20
    ours, ref = iBOTPatchLoss(k), ref_loss.iBOTPatchLoss(k)
    masks = torch.rand(b, n) < 0.3
    masks[0] = False  # a sample without masked tokens still counts in the batch
    m = int(masks.sum())
    s, t = _logits(m, k), torch.randn(m, k)
    ours.accumulate_center(t)
    ref.update_center(t.unsqueeze(0))  # DINOv2 passes the masked tokens as (1, M, K)
    ours.apply_center_update()
    ref.apply_center_update()
    torch.testing.assert_close(ours.center, ref.center.reshape(1, k), **TOL)
    tp_ours, tp_ref = ours.softmax_center_teacher(t, 0.06), ref.softmax_center_teacher(t, 0.06)
    tp_ref = tp_ref.reshape(m, k)  # DINOv2's (1, 1, K) centre broadcasts to (1, M, K)
    torch.testing.assert_close(tp_ours, tp_ref, **TOL)
    torch.testing.assert_close(
        ours.forward_masked(s, tp_ours, masks), ref.forward_masked(s, tp_ref, masks), **TOL
    )
    dense_s, dense_t = _logits(b, n, k), torch.softmax(_logits(b, n, k), -1)
    torch.testing.assert_close(ours(dense_s, dense_t, masks), ref(dense_s, dense_t, masks), **TOL)
    # DINOv2 all-reduces the token count unconditionally; single process: a no-op
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **kw: None)
    torch.testing.assert_close(
        ours.sinkhorn_knopp_teacher(t, 0.05, 3),
        ref.sinkhorn_knopp_teacher(t, 0.05, torch.tensor(m), 3),
        **TOL,
    )


def test_koleo_matches_dinov2():
    x = torch.randn(32, 24)
    torch.testing.assert_close(KoLeoLoss()(x), ref_loss.KoLeoLoss()(x), **TOL)


def test_dino_head_matches_dinov2():
    head_mod = pytest.importorskip("dinov2.layers.dino_head")
    ours = DINOHead(40, 100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    ref = head_mod.DINOHead(40, 100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    with torch.no_grad():
        for name, p_ref in ref.mlp.named_parameters():
            p_ref.copy_(dict(ours.mlp.named_parameters())[name])
        ref.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
        ref.last_layer.weight_g.copy_(ours.last_layer.parametrizations.weight.original0)
    x = torch.randn(8, 40)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
