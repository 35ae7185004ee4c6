"""slidessl: slide-level self-supervised pretraining on tile embeddings with coordinates."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]


def load_encoder(path, map_location="cpu"):
    """Load an exported slide encoder (safetensors + JSON config) for inference.

    ``path`` is an export folder written by ``slidessl pretrain`` (or a training
    checkpoint); the encoder comes back in eval mode.
    """
    from slidessl.models.io import load_encoder as _load

    return _load(path, map_location=map_location)
