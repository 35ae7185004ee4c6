"""Self-supervised objectives: DINO head, DINO / iBOT / KoLeo losses, Sinkhorn-Knopp.

One loss per file; each docstring names its paper. The student/teacher meta-architecture
that composes them lives in ``slidessl.ssl.meta``.
"""

from slidessl.ssl.dino_loss import DINOLoss
from slidessl.ssl.heads import DINOHead
from slidessl.ssl.ibot_loss import iBOTPatchLoss
from slidessl.ssl.koleo_loss import KoLeoLoss
from slidessl.ssl.sinkhorn import sinkhorn_knopp

__all__ = ["DINOHead", "DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp"]
