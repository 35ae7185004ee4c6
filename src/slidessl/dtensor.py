"""FSDP's sharded parameters (DTensors) seen as plain tensors: a package-level helper any
layer may import (the EMA teacher in ``ssl``, gradient norms and clipping in ``train``)."""

from __future__ import annotations

import torch

__all__ = ["is_sharded", "local"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP DTensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (its norms need a sum over ranks)."""
    return any(hasattr(t, "to_local") for t in tensors)
