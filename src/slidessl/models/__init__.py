"""Slide encoders: dense / dilated (LongNet) attention, positions, blocks, export.

Names resolve lazily, so that ``slidessl --help`` does not import torch.
"""

import importlib

_EXPORTS = {
    "EncoderConfig": "slidessl.models.presets",
    "PRESETS": "slidessl.models.presets",
    "SlideEncoder": "slidessl.models.encoder",
    "build_encoder": "slidessl.models.encoder",
    "load_encoder": "slidessl.models.io",
    "save_encoder": "slidessl.models.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slidessl.models' has no attribute {name!r}")
