import math

import pytest
import torch

from slidessl.ssl.koleo_loss import KoLeoLoss


def _brute(x, eps=1e-8):
    x = torch.nn.functional.normalize(x, dim=-1)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return -torch.log(d.min(dim=1).values + eps).mean()


def test_matches_nearest_neighbour_definition():
    x = torch.randn(20, 7)
    torch.testing.assert_close(KoLeoLoss()(x), _brute(x), atol=1e-5, rtol=1e-5)


def test_spread_is_rewarded_and_scale_ignored():
    spread = torch.eye(4)  # orthogonal: neighbour distance sqrt(2)
    torch.testing.assert_close(KoLeoLoss()(spread), torch.tensor(-math.log(math.sqrt(2))))
    torch.testing.assert_close(KoLeoLoss()(3 * spread), KoLeoLoss()(spread))
    bunched = torch.eye(4) + 5.0
    assert KoLeoLoss()(bunched) > KoLeoLoss()(spread)


def test_gradient_pushes_neighbours_apart():
    x = torch.randn(8, 5, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    with torch.no_grad():
        assert KoLeoLoss()(x - 0.01 * x.grad) < loss


def test_needs_two_samples():
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))
