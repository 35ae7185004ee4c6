"""slidessl's own encoders as embedders: a teacher export, a checkpoint, a seeded random init.

Pooling: ``cls`` (final CLS), ``mean`` (mean of the final tokens over real tiles),
``pooled`` (the encoder's configured pool), ``layers:I,J,...`` (the concatenation of the
pooled outputs of blocks I, J, ... - negative indices count from the last block), or
``regions:S[,T...]`` (the mean over the slide's S x S-tile regions, at a stride of S / 2,
of each region's CLS, concatenated over the sides given: the readout of an encoder
pretrained on region-sized crops, as HIPT reads region embeddings).

Slides are batched with padding masks, in eval mode under ``torch.no_grad``: a slide's
vector does not depend on the slides batched with it (up to float rounding of the padded
forward).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slidessl.data.collate import pad_crops
from slidessl.eval.embedder import ENCODER_MAX_TILES, Embedder
from slidessl.models.encoder import readout

__all__ = [
    "POOLINGS",
    "EncoderEmbedder",
    "pad_batch",
    "parse_pooling",
    "region_embedding",
    "regions_of",
]

POOLINGS = ("cls", "mean", "pooled")


def parse_pooling(pooling: str) -> tuple[str, list[int] | None]:
    """``(kind, ints)``: ``layers:I,J`` -> block indices, ``regions:S[,T]`` -> region sides."""
    if pooling in POOLINGS:
        return pooling, None
    for kind in ("layers", "regions"):
        if pooling.startswith(kind + ":"):
            try:
                ints = [int(t) for t in pooling[len(kind) + 1 :].split(",") if t.strip()]
            except ValueError as exc:
                raise ValueError(f"pooling {pooling!r}: {kind} must be integers") from exc
            if ints and (kind == "layers" or min(ints) >= 1):
                return kind, ints
    raise ValueError(
        f"unknown pooling {pooling!r}; use cls, mean, pooled, layers:-1,-2 or regions:8"
    )


def regions_of(grid: torch.Tensor, side: int, min_tiles: int | None = None) -> list:
    """Row indices of the tiles in each grid-aligned ``side`` x ``side`` region that holds
    at least ``min_tiles`` tiles (default ``side * side // 8``, at least 1); the whole slide
    when no region does."""
    if min_tiles is None:
        min_tiles = max(1, side * side // 8)
    cell = torch.div(grid, side, rounding_mode="floor")
    cell = cell - cell.min(dim=0).values
    key = cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1]
    order = torch.argsort(key, stable=True)
    counts = torch.unique_consecutive(key[order], return_counts=True)[1]
    groups = [g for g in torch.split(order, counts.tolist()) if len(g) >= min_tiles]
    return [torch.sort(g).values for g in groups] or [torch.arange(len(grid))]


def _shares_tiles(encoder) -> bool:
    """Whether a tile's token is the same in every region that holds it (up to the region's
    border): every block local and no absolute position added to the tiles."""
    blocks = getattr(encoder, "blocks", None)
    return (
        bool(blocks)
        and all(getattr(b, "local", False) for b in blocks)
        and (encoder.config.get("pos_mode") == "none")
    )


def region_embedding(encoder, item: dict, side: int, batch_size: int = 64) -> torch.Tensor:
    """Mean over the slide's ``side`` x ``side`` regions of the encoder's CLS of each region:
    the readout of an encoder pretrained on region-sized crops.

    Regions tile the grid at a stride of ``side / 2`` (the four grid-aligned tilings offset
    by half a region, `regions_of` each), so every tile lies in four regions and no
    structure is cut by one fixed region border. Features are centred on the *slide's* mean
    when the encoder centres its input. An encoder whose blocks are all local and whose
    tiles carry no absolute position computes the tile tokens once on the whole slide
    (:meth:`SlideEncoder.forward_regions`: tiles keep their true neighbours across region
    borders); any other runs each region as an input of its own, positions relative to
    the region.
    """
    x, g = item["features"], item["grid"]
    center = x.double().mean(dim=0).float()
    half = side // 2
    shifts = [(0, 0)] if half == 0 else [(0, 0), (half, 0), (0, half), (half, half)]
    groups = [r for dx, dy in shifts for r in regions_of(g + g.new_tensor([dx, dy]), side)]
    if _shares_tiles(encoder):  # tile tokens once for the slide, one CLS per region
        return encoder.forward_regions(x, g, groups, center).double().mean(dim=0).float()
    total = None
    for s in range(0, len(groups), batch_size):
        crops = [
            {"features": x[r], "coords": g[r] - g[r].min(dim=0).values}
            for r in groups[s : s + batch_size]
        ]
        batch = pad_crops(crops)
        cls, _ = encoder.forward_tokens(
            batch["features"],
            batch["coords"],
            batch["padding_mask"],
            center=center.expand(len(crops), -1),
        )
        part = cls.double().sum(dim=0)
        total = part if total is None else total + part
    return (total / len(groups)).float()


def pad_batch(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slide dicts -> features (B, N, D), grid (B, N, 2), padding_mask (B, N) True = pad."""
    batch = pad_crops([{"features": it["features"], "coords": it["grid"]} for it in items])
    return batch["features"], batch["coords"], batch["padding_mask"]


class EncoderEmbedder(Embedder):
    """A slidessl :class:`~slidessl.models.encoder.SlideEncoder` read out by ``pooling``.

    ``EncoderEmbedder(module, pooling)`` wraps a built encoder; :meth:`load` reads a teacher
    export / ``model.safetensors`` / training checkpoint, :meth:`random` a seeded random
    init built once the input dim is known (:meth:`set_input_dim`)."""

    auto_max_tiles = ENCODER_MAX_TILES

    def __init__(self, module, pooling: str = "cls", key: str = "", description: str = ""):
        self.kind, self.layers = parse_pooling(pooling)
        self.module, self.pooling = module, pooling
        self.key, self.description = key, description
        self._random: tuple[str, int] | None = None

    @classmethod
    def load(cls, path: str, pooling: str = "cls") -> EncoderEmbedder:
        """The encoder saved at ``path`` (``slidessl.load_encoder``), in eval mode."""
        from slidessl import load_encoder

        if not Path(path).exists():
            raise ValueError(
                f"{path}: no such encoder (expected a teacher folder, checkpoint, meanpool, "
                "random[:PRESET] or gigapath:PATH)"
            )
        resolved = str(Path(path).resolve())
        return cls(load_encoder(path).eval(), pooling, resolved, resolved)

    @classmethod
    def random(cls, spec: str, arg: str, seed: int, pooling: str = "cls") -> EncoderEmbedder:
        """``random[:ARG]``: a random init (``torch.manual_seed(seed)``) of preset ``ARG``
        (default ``tiny``) or of the architecture of the export at path ``ARG``."""
        from slidessl.models.encoder import PRESETS

        name = arg or "tiny"
        if name not in PRESETS and not Path(name).exists():
            raise ValueError(f"{spec}: {name!r} is neither a preset {sorted(PRESETS)} nor a path")
        key = f"random:{Path(arg).resolve()}" if arg and Path(arg).exists() else spec
        emb = cls(None, pooling, key, f"random:{name}:seed{seed}")
        emb._random = (name, int(seed))
        return emb

    def set_input_dim(self, dim: int) -> None:
        if self.module is not None or self._random is None:
            return
        from slidessl.models.encoder import PRESETS, SlideEncoder, build_encoder

        name, seed = self._random
        torch.manual_seed(seed)
        if name in PRESETS:
            enc = build_encoder(name, in_dim=dim)
        else:
            from slidessl import load_encoder

            cfg = dict(load_encoder(name).config)
            cfg["in_dim"] = dim
            torch.manual_seed(seed)
            enc = SlideEncoder(**cfg)
        self.module = enc.eval()

    @torch.no_grad()
    def embed(self, items: list[dict]) -> np.ndarray:
        encoder, kind, layers = self.module, self.kind, self.layers
        x, g, mask = pad_batch(items)
        if x.shape[-1] != encoder.in_dim:
            raise ValueError(
                f"slide {items[0]['slide_id']!r}: tile features have dim {x.shape[-1]}, "
                f"the encoder expects {encoder.in_dim}"
            )
        if kind == "layers":
            states = encoder.forward_intermediates(
                x, g, mask, indices=layers, norm=True, intermediates_only=True
            )
            return torch.cat([encoder.forward_head(h, mask) for h in states], -1).float().numpy()
        if kind == "regions":
            return np.stack(
                [
                    torch.cat([region_embedding(encoder, it, side) for side in layers]).numpy()
                    for it in items
                ]
            )
        if kind == "pooled":
            return encoder(x, g, mask).float().numpy()
        return readout(encoder, x, g, mask, kind).numpy()
