"""DINO projection head: MLP, L2-normalised bottleneck, weight-normed prototype layer.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, ICCV 2021), Sec. 3 and Appendix: a 3-layer MLP (hidden 2048, GELU) to a 256-d
bottleneck, L2 normalisation, then a weight-normalised linear layer to K prototypes whose
norm (``g``) is fixed to one. The same head (separate or shared) gives the iBOT patch logits
(Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022).

Example::

    >>> import torch
    >>> head = DINOHead(in_dim=64, out_dim=1024, hidden_dim=128, bottleneck_dim=32)
    >>> head(torch.randn(4, 64)).shape
    torch.Size([4, 1024])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

__all__ = ["DINOHead"]


def _mlp(nlayers: int, in_dim: int, hidden_dim: int, out_dim: int, use_bn: bool, bias: bool):
    if nlayers == 1:
        return nn.Linear(in_dim, out_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, out_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``x (..., in_dim) -> logits (..., out_dim)`` over ``out_dim`` prototypes.

    ``last_layer`` is the weight-normed prototype layer (the trainer freezes it early);
    its magnitude ``g`` (``last_layer.parametrizations.weight.original0``) starts at one.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if int(value) < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        nlayers = max(int(nlayers), 1)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.mlp = _mlp(nlayers, in_dim, hidden_dim, bottleneck_dim, use_bn, mlp_bias)
        self.apply(self._init_weights)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = parametrizations.weight_norm(last)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects last dimension {self.in_dim}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        z = self.mlp(x.reshape(-1, self.in_dim))
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        z = nn.functional.normalize(z, dim=-1, p=2, eps=eps)
        return self.last_layer(z).reshape(*lead, self.out_dim)
