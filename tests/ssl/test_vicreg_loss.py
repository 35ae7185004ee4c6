import pytest
import torch

from slidessl.ssl.vicreg_loss import VarianceCovarianceLoss


def _reference(z, gamma=1.0, cov_weight=1 / 25, eps=1e-4):
    """Loop form of VICReg Eq. 1-4 (float64)."""
    z = z.double()
    n, d = z.shape
    var = 0.0
    for j in range(d):
        col = z[:, j]
        var += max(0.0, gamma - float(torch.sqrt(((col - col.mean()) ** 2).sum() / (n - 1) + eps)))
    cov = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                c = float(((z[:, i] - z[:, i].mean()) * (z[:, j] - z[:, j].mean())).sum() / (n - 1))
                cov += c * c
    return var / d + cov_weight * cov / d


def test_matches_the_loop_reference(rng):
    z = torch.as_tensor(
        rng.standard_normal((12, 5)) * rng.uniform(0.2, 2.0, 5), dtype=torch.float32
    )
    got = VarianceCovarianceLoss()(z)
    assert float(got) == pytest.approx(_reference(z), rel=1e-5)


def test_rewards_spread_decorrelated_dimensions(rng):
    loss = VarianceCovarianceLoss()
    white = torch.as_tensor(rng.standard_normal((256, 4)), dtype=torch.float32) * 1.5
    collapsed = white.clone()
    collapsed[:, 1] = 0.01 * collapsed[:, 1]  # one dimension nearly constant
    correlated = white.clone()
    correlated[:, 2] = correlated[:, 0]  # two dimensions the same
    assert loss(white) < 0.05
    assert loss(collapsed) > loss(white) + 0.2 and loss(correlated) > loss(white) + 0.05
    z = correlated.clone().requires_grad_(True)
    loss(z).backward()
    with torch.no_grad():
        assert loss(z - 0.5 * z.grad) < loss(correlated)


def test_needs_two_samples():
    with pytest.raises(ValueError, match="n >= 2"):
        VarianceCovarianceLoss()(torch.randn(1, 4))
