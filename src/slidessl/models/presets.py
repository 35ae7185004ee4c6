"""The slide encoder's options as one typed, frozen :class:`EncoderConfig` (each option
once, with its type and default), the enums of its choices, and the named presets.

``EncoderConfig(**options)`` converts and checks every value (a wrong type, an invalid
choice or an inconsistent combination raises ``ValueError`` naming the option);
``EncoderConfig.from_dict`` also rejects unknown names. ``to_dict()`` is the plain form
(strings, lists) that ``SlideEncoder.config`` and the exported ``config.json`` hold.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass
from enum import Enum

from slidessl.models.dilated.plan import validate_branches
from slidessl.models.posenc import POS_MODES

__all__ = [
    "Attention",
    "DEFAULT_DILATIONS",
    "DEFAULT_SEGMENTS",
    "EncoderConfig",
    "GIGAPATH_DILATIONS",
    "GIGAPATH_SEGMENTS",
    "Pool",
    "PosBias",
    "PosMode",
    "PRESETS",
]

# Chosen from `slidessl bench attention` (docs/performance.md): 10x fewer attention FLOPs
# than dense at 16k tokens while every token still sees a 1024-token neighbourhood at r=1.
DEFAULT_SEGMENTS = (1024, 4096, 16384, 65536)
DEFAULT_DILATIONS = (1, 4, 8, 16)
GIGAPATH_SEGMENTS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATIONS = (1, 2, 4, 8, 16)


class Attention(str, Enum):
    """The global blocks' attention: LongNet dilated, or dense."""

    dilated = "dilated"
    dense = "dense"


class Pool(str, Enum):
    """The slide vector of ``forward``: the CLS token, or the mean of the tile tokens."""

    cls = "cls"
    mean = "mean"


class PosBias(str, Enum):
    """``alibi2d``: the global (non-local) blocks get TITAN's 2-D ALiBi bias."""

    none = "none"
    alibi2d = "alibi2d"


# the position modes of `slidessl.models.posenc` (that module's list is the one list)
PosMode = Enum("PosMode", [(m, m) for m in POS_MODES], type=str, module=__name__)
PosMode.__doc__ = "Absolute positions from grid coordinates (see `slidessl.models.posenc`)."


@dataclass(frozen=True)
class EncoderConfig:
    """Every option of :class:`slidessl.models.encoder.SlideEncoder`, with its default."""

    in_dim: int = 1536  # tile feature width
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 16
    mlp_dim: int = 3072
    attention: Attention = Attention.dilated
    segments: tuple[int, ...] = DEFAULT_SEGMENTS  # dilated attention: branch segment lengths
    dilations: tuple[int, ...] = DEFAULT_DILATIONS  # ... and their dilation rates
    subln: bool = True  # MAGNETO sub-LN
    subln_init: bool = True  # MAGNETO's init gain on the sub-LN branches
    encoder_norm: bool = False  # a LayerNorm after the blocks (Prov-GigaPath's)
    block_eps: float = 1e-5
    norm_eps: float = 1e-6
    pos_mode: PosMode = PosMode.xy
    pool: Pool = Pool.cls
    drop_path_rate: float = 0.0  # stochastic depth, 0 at the first block to this at the last
    dropout: float = 0.0
    grad_checkpointing: bool = False
    exact_grad: bool = True
    grid_context: int = 0  # odd k > 0: a k x k depthwise conv over the tile grid before the blocks
    input_center: bool = False  # subtract each input's (slide's or crop's) mean tile feature first
    local_kernel: int = 0  # odd k >= 3: the first `local_depth` blocks see k x k grid neighbours
    local_depth: int = 0
    pos_bias: PosBias = PosBias.none
    cls_pos: bool = False  # local blocks: the CLS sees its tiles' positions (relative to its input)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _convert(f.name, _TYPES[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        try:
            segments, dilations = validate_branches(self.segments, self.dilations)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"encoder options segments / dilations: {exc}") from None
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "dilations", dilations)
        if self.embed_dim % 4 or self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by 4 and by "
                f"num_heads {self.num_heads}"
            )
        lk, ld = self.local_kernel, self.local_depth
        if (lk > 0) != (ld > 0) or ld > self.depth or (lk and (lk < 3 or lk % 2 == 0)):
            raise ValueError(
                f"local attention needs an odd local_kernel >= 3 and 1 <= local_depth <= depth "
                f"({self.depth}), or both 0; got local_kernel={lk}, local_depth={ld}"
            )

    @classmethod
    def from_dict(cls, options: typing.Mapping) -> EncoderConfig:
        """``EncoderConfig(**options)``; an unknown name is a ``ValueError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(
                f"unknown SlideEncoder option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**options)

    def replace(self, **options) -> EncoderConfig:
        """A copy with ``options`` changed (checked as :meth:`from_dict`)."""
        return type(self).from_dict({**self.__dict__, **options})

    def to_dict(self) -> dict:
        """Plain values: enums as their strings, ``segments`` / ``dilations`` as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        out["segments"], out["dilations"] = list(self.segments), list(self.dilations)
        return out


_TYPES = typing.get_type_hints(EncoderConfig)


def _convert(name: str, kind, value):
    """``value`` as option ``name``'s type ``kind``, or a ValueError naming the option."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            choices = [m.value for m in kind]
            raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
    if kind is bool:
        ok = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool
        want = "a bool"
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        want = "an int"
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        want = "a number"
    else:  # tuple[int, ...]: checked by validate_branches
        ok = isinstance(value, (list, tuple))
        want = "a list of ints"
    if not ok:
        raise ValueError(
            f"encoder option {name} must be {want}, got {value!r} ({type(value).__name__})"
        )
    return kind(value) if kind in (bool, int, float) else tuple(value)


PRESETS: dict[str, EncoderConfig] = {
    # CPU demo / tests: trains in minutes
    "tiny": EncoderConfig(
        in_dim=64,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        segments=(64, 256, 1024),
        dilations=(1, 2, 4),
    ),
    "small": EncoderConfig(in_dim=1536, embed_dim=256, depth=6, num_heads=8, mlp_dim=1024),
    "base": EncoderConfig(in_dim=1536, embed_dim=768, depth=12, num_heads=16, mlp_dim=3072),
    # Prov-GigaPath slide encoder (gigapath_slide_enc12l768d) layout and positions
    "gigapath": EncoderConfig(
        in_dim=1536,
        embed_dim=768,
        depth=12,
        num_heads=16,
        mlp_dim=3072,
        segments=GIGAPATH_SEGMENTS,
        dilations=GIGAPATH_DILATIONS,
        encoder_norm=True,
        pos_mode=PosMode.gigapath,
        drop_path_rate=0.1,
    ),
}
