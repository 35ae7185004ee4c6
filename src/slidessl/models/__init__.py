"""Slide encoders: dense / dilated (LongNet) attention, positions, blocks, export."""

from slidessl.models.encoder import PRESETS, SlideEncoder, build_encoder
from slidessl.models.io import load_encoder, save_encoder

__all__ = ["PRESETS", "SlideEncoder", "build_encoder", "load_encoder", "save_encoder"]
