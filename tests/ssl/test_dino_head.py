import pytest
import torch

from slidessl.ssl.heads import DINOHead


@pytest.mark.parametrize("nlayers, use_bn", [(1, False), (3, False), (3, True)])
def test_shapes_and_unit_prototypes(nlayers, use_bn):
    head = DINOHead(24, 300, hidden_dim=48, bottleneck_dim=16, nlayers=nlayers, use_bn=use_bn)
    x = torch.randn(6, 24)
    out = head(x)
    assert out.shape == (6, 300)
    assert head(torch.randn(2, 5, 24)).shape == (2, 5, 300)
    # weight norm with g = 1: every prototype has unit norm, so logits are cosines
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(300))
    assert out.abs().max() <= 1.0 + 1e-5


def test_prototype_layer_is_named_last_layer_and_trains():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=8)
    names = [n for n, _ in head.named_parameters() if n.startswith("last_layer")]
    assert len(names) == 2  # magnitude g and direction v
    head(torch.randn(4, 8)).logsumexp(-1).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
    # the direction gets a gradient; g is fixed at one by the trainer only through freezing
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0


def test_scale_of_input_does_not_matter():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=8, nlayers=1, mlp_bias=False)
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), head(5.0 * x))  # L2-normalised bottleneck


def test_bad_dimensions():
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, 0)
    head = DINOHead(8, 16, hidden_dim=16, bottleneck_dim=8)
    with pytest.raises(ValueError, match="last dimension 8"):
        head(torch.randn(3, 9))
