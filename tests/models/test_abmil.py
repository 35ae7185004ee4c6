import pytest
import torch

from slidessl.models.abmil import GatedABMIL


def test_padding_gets_no_attention_and_changes_nothing(rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = GatedABMIL(16, n_outputs=3).eval()
    x = torch.randn(1, 20, 16)
    padded = torch.cat([x, torch.randn(1, 7, 16) * 50], dim=1)
    mask = torch.zeros(1, 27, dtype=torch.bool)
    mask[:, 20:] = True
    ref, attn_ref = model(x, return_attention=True)
    out, attn = model(padded, mask, return_attention=True)
    assert out.shape == (1, 3) and attn.shape == (1, 27)
    assert torch.all(attn[:, 20:] == 0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(attn[:, :20], attn_ref)
    torch.testing.assert_close(attn.sum(1), torch.ones(1))


def test_gated_attention_formula():
    torch.manual_seed(0)
    model = GatedABMIL(4, n_outputs=1, proj_dim=6, attn_dim=5).eval()
    x = torch.randn(2, 9, 4)
    h = torch.relu(model.proj[0](x))
    a = model.attn_w(torch.tanh(model.attn_v(h)) * torch.sigmoid(model.attn_u(h))).squeeze(-1)
    a = torch.softmax(a, dim=1)
    expected = model.head((a.unsqueeze(-1) * h).sum(1))
    torch.testing.assert_close(model(x), expected)


def test_bad_input_errors():
    model = GatedABMIL(8)
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        model(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="no tile"):
        model(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        model(torch.randn(2, 5, 8), torch.zeros(2, 5))
