import math

import pytest
import torch
import torch.nn.functional as F

from slidessl.ssl.arrangement_loss import ArrangementLoss, shuffle_positions


def test_matches_its_formula(rng):
    real, shuf, tgt = (torch.as_tensor(rng.standard_normal((6, 5)), dtype=torch.float32)
                       for _ in range(3))  # fmt: skip
    got = ArrangementLoss(0.2)(real, shuf, tgt)
    want = 0.0
    for r, s, t in zip(real.double(), shuf.double(), tgt.double()):
        pos = float(F.cosine_similarity(r, t, dim=0))
        neg = float(F.cosine_similarity(s, t, dim=0))
        want += math.log1p(math.exp((neg - pos) / 0.2))
    assert float(got) == pytest.approx(want / 6, rel=1e-5)
    same = torch.randn(4, 3)
    assert float(ArrangementLoss()(same, same, torch.randn(4, 3))) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="temperature"):
        ArrangementLoss(0.0)


def test_gradient_pulls_real_and_pushes_shuffled(rng):
    real = torch.randn(5, 4, requires_grad=True)
    shuf = torch.randn(5, 4, requires_grad=True)
    tgt = torch.randn(5, 4)
    loss = ArrangementLoss(0.1)(real, shuf, tgt)
    loss.backward()
    with torch.no_grad():
        assert ArrangementLoss(0.1)(real - 0.01 * real.grad, shuf - 0.01 * shuf.grad, tgt) < loss


def test_shuffle_permutes_each_rows_real_tiles_only(rng):
    coords = torch.as_tensor(rng.integers(0, 50, (3, 10, 2)))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 1:] = True
    out = shuffle_positions(coords, pad, torch.Generator().manual_seed(1))
    for i, m in enumerate((10, 6, 1)):
        assert sorted(map(tuple, out[i, :m].tolist())) == sorted(map(tuple, coords[i, :m].tolist()))
        assert torch.equal(out[i, m:], coords[i, m:])
    assert not torch.equal(out[0], coords[0])
