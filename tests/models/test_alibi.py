"""2-D ALiBi attention against an explicit dense reference."""

import pytest
import torch

from slidessl.models import build_encoder
from slidessl.models.alibi import alibi_attention, alibi_slopes


def _reference(q, k, v, coords, slopes, pad):
    b, n1, h, d = q.shape
    pos = torch.cat([torch.zeros(b, 1, 2), coords.double()], 1)
    dist = torch.cdist(pos, pos)
    dist[:, 0, :] = 0
    dist[:, :, 0] = 0
    scores = (
        torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
        - slopes[None, :, None, None] * dist[:, None]
    )
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)
    return out.masked_fill(pad[:, :, None, None], 0.0)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_alibi_equals_reference_and_masks_padding(rng, chunk):
    b, n, h, d = 2, 23, 4, 8
    coords = torch.as_tensor(rng.integers(0, 30, (b, n, 2)))
    pad = torch.zeros(b, 1 + n, dtype=torch.bool)
    pad[0, 1 + 17 :] = True
    q, k, v = (torch.randn(b, 1 + n, h, d, dtype=torch.float64) for _ in range(3))
    slopes = alibi_slopes(h)
    got = alibi_attention(q, k, v, coords, slopes, pad, chunk=chunk)
    torch.testing.assert_close(got, _reference(q, k, v, coords, slopes, pad))
    k2 = k.clone()
    k2[pad] = 50.0
    torch.testing.assert_close(
        alibi_attention(q, k2, v, coords, slopes, pad, chunk=chunk)[~pad], got[~pad]
    )


def test_slopes_and_translation_invariance(rng):
    torch.testing.assert_close(
        alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625], dtype=torch.float64)
    )
    torch.manual_seed(int(rng.integers(1 << 20)))
    enc = build_encoder(
        "tiny", in_dim=8, attention="dense", pos_mode="none", pos_bias="alibi2d"
    ).eval()
    x = torch.randn(1, 40, 8)
    g = torch.as_tensor(rng.integers(0, 20, (1, 40, 2)))
    with torch.no_grad():
        torch.testing.assert_close(enc(x, g + 7), enc(x, g), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(enc(x, g * 3), enc(x, g), atol=1e-4)  # distances matter


def test_alibi_needs_dense_attention():
    with pytest.raises(ValueError, match="dense"):
        build_encoder("tiny", in_dim=8, pos_bias="alibi2d")
