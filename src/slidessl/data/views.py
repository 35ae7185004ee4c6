"""Multi-crop views of a slide on its tile grid (DINO global/local crops over coordinates).

Reference: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (SwAV, NeurIPS 2020), multi-crop; Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers" (DINO, ICCV 2021); Oquab et al., "DINOv2" (TMLR 2024).
On a slide a crop is an axis-aligned window on the tile grid: its scale is the area fraction
of the tissue's bounding box, its aspect ratio (relative to the bounding box's) is jittered
log-uniformly, and it must hold a
minimum number of tiles (windows are redrawn ``max_tries`` times, then the fallback is the
smallest square around a random tile that holds the minimum). Crops above their cap are
subsampled uniformly over space (``slidessl.data.grid.cap_tiles``).

Layouts: ``"original"`` windows the true grid (empty cells are absent tokens);
``"compact"`` first repacks the tiles into a near-square grid without holes
(``slidessl.data.relayout``) and windows that, so crops are full; positions stay the true
coordinates unless ``position_coords="packed"``.

Embedding-level augmentations, each a switch: flips and 90-degree rotations of the
coordinates (origin renormalised, tokens re-sorted), Gaussian feature noise with a std
relative to the slide's per-dimension feature std, and token dropout. Global crops carry
an iBOT block mask (``slidessl.data.masking``).

Example::

    >>> import numpy as np, torch
    >>> grid = torch.stack(torch.meshgrid(torch.arange(30), torch.arange(30),
    ...                                   indexing="xy"), -1).reshape(-1, 2)
    >>> slide = {"slide_id": "s0", "index": 0, "features": torch.randn(900, 8), "grid": grid}
    >>> crops = MultiCrop(MultiCropConfig(n_local=2))(slide, np.random.default_rng(0))
    >>> len(crops["global"]), len(crops["local"]), crops["global"][0]["features"].shape[1]
    (2, 2, 8)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slidessl.data.grid import cap_tiles, spatial_order
from slidessl.data.masking import sample_mask
from slidessl.data.relayout import PACKINGS, pack_compact

__all__ = ["MultiCrop", "MultiCropConfig"]

LAYOUTS = ("original", "compact")
OVERSIZE = ("thin", "shrink")  # a window above its cap: subsample it, or keep its core whole
_PACK_CACHE = 64  # compact layouts kept per MultiCrop (per DataLoader worker)


def _pair(value: Any, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"crops.{name} must be a (low, high) range with low <= high, got {value}")
    return lo, hi


@dataclass
class MultiCropConfig:
    """The ``crops:`` section of a recipe. Scales are area fractions of the tissue bbox."""

    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.3)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    global_min_tiles: int = 32
    local_min_tiles: int = 8
    global_max_tiles: int = 8192
    local_max_tiles: int = 1024
    oversize: str = "thin"
    region_max_tiles: int | None = None
    max_tries: int = 10
    layout: str = "original"
    packing: str = "strips"
    band_height: int | None = None
    position_coords: str = "true"
    order: str = "hilbert"
    flip: bool = True
    rot90: bool = True
    translate: int = 0
    feature_noise: float = 0.0
    feature_shift: float = 0.0
    feature_gain: float = 0.0
    token_drop: float = 0.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = field(default=(0.1, 0.5))
    mask_min_block_tiles: int = 4
    mask_max_block_tiles: int | None = None

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "aspect_ratio", "mask_ratio"):
            setattr(self, name, _pair(getattr(self, name), name))
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(
                f"crops: need n_global >= 1 and n_local >= 0, got "
                f"{self.n_global} and {self.n_local}"
            )
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if lo <= 0 or hi > 1:
                raise ValueError(f"crops.{name} must lie in (0, 1], got {(lo, hi)}")
        if self.aspect_ratio[0] <= 0:
            raise ValueError(f"crops.aspect_ratio must be positive, got {self.aspect_ratio}")
        for name in (
            "global_min_tiles",
            "local_min_tiles",
            "global_max_tiles",
            "local_max_tiles",
            "max_tries",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"crops.{name} must be >= 1, got {getattr(self, name)}")
        for name, lo_name in (
            ("global_max_tiles", "global_min_tiles"),
            ("local_max_tiles", "local_min_tiles"),
        ):
            if getattr(self, name) < getattr(self, lo_name):
                raise ValueError(
                    f"crops.{name} ({getattr(self, name)}) is below "
                    f"crops.{lo_name} ({getattr(self, lo_name)})"
                )
        checks = (
            ("layout", LAYOUTS),
            ("packing", PACKINGS),
            ("position_coords", ("true", "packed")),
            ("oversize", OVERSIZE),
            ("order", ("hilbert", "zorder", "rowmajor")),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"crops.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.region_max_tiles is not None and int(self.region_max_tiles) < 1:
            raise ValueError(f"crops.region_max_tiles must be >= 1, got {self.region_max_tiles}")
        if int(self.translate) < 0:
            raise ValueError(f"crops.translate must be >= 0, got {self.translate}")
        if self.band_height is not None and int(self.band_height) < 1:
            raise ValueError(f"crops.band_height must be >= 1, got {self.band_height}")
        for name in ("feature_noise", "feature_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"crops.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.feature_gain < 1:
            raise ValueError(f"crops.feature_gain must lie in [0, 1), got {self.feature_gain}")
        if not 0 <= self.token_drop < 1:
            raise ValueError(f"crops.token_drop must lie in [0, 1), got {self.token_drop}")
        if not 0 <= self.mask_probability <= 1:
            raise ValueError(
                f"crops.mask_probability must lie in [0, 1], got {self.mask_probability}"
            )
        if not (0 <= self.mask_ratio[0] and self.mask_ratio[1] <= 1):
            raise ValueError(f"crops.mask_ratio must lie in [0, 1], got {self.mask_ratio}")

    @classmethod
    def from_dict(cls, section: dict | None) -> MultiCropConfig:
        """Build from a config mapping; unknown keys are an error that names them."""
        section = dict(section or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown crops option(s) {unknown}; known: {sorted(known)}")
        return cls(**section)


def _window(
    grid: np.ndarray,
    scale: tuple[float, float],
    aspect: tuple[float, float],
    min_tiles: int,
    tries: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Row indices of the tiles inside one random window holding at least ``min_tiles``."""
    lo, hi = grid.min(axis=0), grid.max(axis=0)
    width, height = (hi - lo + 1).tolist()
    log_a = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(tries):
        s = rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_a))
        w = min(width, max(1, int(round(width * math.sqrt(s * r)))))
        h = min(height, max(1, int(round(height * math.sqrt(s / r)))))
        x0 = lo[0] + int(rng.integers(width - w + 1))
        y0 = lo[1] + int(rng.integers(height - h + 1))
        inside = (
            (grid[:, 0] >= x0) & (grid[:, 0] < x0 + w) & (grid[:, 1] >= y0) & (grid[:, 1] < y0 + h)
        )
        if inside.sum() >= min_tiles:
            return np.flatnonzero(inside)
    # Fallback: the smallest square around a random tile that holds min_tiles tiles.
    centre = grid[rng.integers(len(grid))]
    cheb = np.abs(grid - centre).max(axis=1)
    radius = np.partition(cheb, min_tiles - 1)[min_tiles - 1]
    return np.flatnonzero(cheb <= radius)


def _nearest(grid: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the ``count`` tiles nearest a random tile (Chebyshev distance on
    the grid, ties broken at random): a window at the tissue's full density."""
    centre = grid[rng.integers(len(grid))]
    dist = np.abs(grid - centre).max(axis=1) + rng.random(len(grid)) * 0.5
    return np.sort(np.argpartition(dist, count - 1)[:count])


def _rotate_flip(coords: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate (k quarter turns) and optionally mirror positions, origin back at zero."""
    x, y = coords[:, 0], coords[:, 1]
    if flip:
        x = -x
    for _ in range(k % 4):
        x, y = -y, x
    out = np.stack([x, y], axis=1)
    return out - out.min(axis=0) if len(out) else out


class MultiCrop:
    """``MultiCrop(cfg)(slide, rng) -> {"slide_id", "index", "global": [...], "local": [...]}``.

    Every crop is ``{"features": FloatTensor (n, D), "coords": LongTensor (n, 2),
    "rows": LongTensor (n,)}`` (rows index the slide's tiles), tokens in spatial order of
    ``coords``; global crops add ``"ibot_mask"`` (n,) bool.
    """

    def __init__(self, cfg: MultiCropConfig | dict | None = None) -> None:
        if cfg is None or isinstance(cfg, dict):
            cfg = MultiCropConfig.from_dict(cfg)
        self.cfg = cfg
        self._packed: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def packed_grid(self, grid: np.ndarray) -> np.ndarray:
        """The compact layout of ``grid`` (cached for the last few slides seen)."""
        key = (len(grid), hashlib.blake2b(grid.tobytes(), digest_size=16).hexdigest())
        if key in self._packed:
            self._packed.move_to_end(key)
            return self._packed[key]
        packed = pack_compact(grid, self.cfg.packing, self.cfg.band_height)
        packed.setflags(write=False)
        self._packed[key] = packed
        if len(self._packed) > _PACK_CACHE:
            self._packed.popitem(last=False)
        return packed

    def _check(self, slide: dict) -> tuple[str, torch.Tensor, np.ndarray]:
        name = str(slide.get("slide_id", "<unknown slide>"))
        feats, grid = slide.get("features"), slide.get("grid")
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
            raise ValueError(f"slide {name}: 'features' must be a (n, D) tensor")
        g = np.asarray(grid.cpu().numpy() if isinstance(grid, torch.Tensor) else grid)
        if g.ndim != 2 or g.shape[1] != 2 or len(g) != len(feats):
            raise ValueError(f"slide {name}: 'grid' must be ({len(feats)}, 2), got {g.shape}")
        if len(g) == 0:
            raise ValueError(f"slide {name}: no tiles to crop")
        if not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"slide {name}: 'grid' must hold integer positions, got {g.dtype}")
        return name, feats.float(), g.astype(np.int64)

    def __call__(self, slide: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        name, feats, true_grid = self._check(slide)
        if cfg.layout == "compact":
            crop_grid = self.packed_grid(true_grid)
            pos_grid = crop_grid if cfg.position_coords == "packed" else true_grid
        else:
            crop_grid = pos_grid = true_grid
        spread = None
        if cfg.feature_noise > 0 or cfg.feature_shift > 0:
            # per-dimension std, estimated on <= 4096 evenly spaced rows
            sample = feats[:: max(1, len(feats) // 4096)]
            spread = sample.std(dim=0) if len(sample) > 1 else torch.zeros(feats.shape[1])
        n = len(feats)
        center = feats.double().mean(dim=0).float()  # the slide's mean tile feature
        out = {
            "slide_id": slide.get("slide_id"),
            "index": slide.get("index"),
            "global": [],
            "local": [],
        }
        region = np.arange(n)
        if cfg.region_max_tiles is not None and n > cfg.region_max_tiles:
            region = _nearest(crop_grid, int(cfg.region_max_tiles), rng)
            n = len(region)
        kinds = (
            ("global", cfg.n_global, cfg.global_scale, cfg.global_min_tiles, cfg.global_max_tiles),
            ("local", cfg.n_local, cfg.local_scale, cfg.local_min_tiles, cfg.local_max_tiles),
        )
        for kind, count, scale, min_tiles, max_tiles in kinds:
            for _ in range(count):
                rows = region[
                    _window(
                        crop_grid[region],
                        scale,
                        cfg.aspect_ratio,
                        min(min_tiles, n),
                        cfg.max_tries,
                        rng,
                    )
                ]
                if len(rows) > max_tiles:
                    rows = self._cap(crop_grid, rows, max_tiles, rng)
                crop = self._finish(feats, pos_grid, rows, spread, kind == "global", rng)
                crop["center"] = center
                out[kind].append(crop)
        return out

    def _cap(self, grid: np.ndarray, rows: np.ndarray, max_tiles: int, rng) -> np.ndarray:
        """At most ``max_tiles`` of a window's ``rows``: ``thin`` subsamples them uniformly
        over space (every region keeps its share, neighbours are lost); ``shrink`` keeps the
        ``max_tiles`` tiles nearest a random tile of the window (Chebyshev distance, ties
        at random): a smaller window at the tissue's full density."""
        g = grid[rows]
        if self.cfg.oversize == "thin":
            return rows[cap_tiles(g - g.min(axis=0), max_tiles, rng)]
        return rows[_nearest(g, max_tiles, rng)]

    def _jitter(self, x: torch.Tensor, spread, rng: np.random.Generator) -> torch.Tensor:
        """Embedding-level photometric augmentation, in place on the crop's own copy.

        ``feature_gain``: one gain ``1 + U(-g, g)`` for the whole crop; ``feature_shift``: one
        offset ``N(0, (s * std_d)^2)`` per dimension for the whole crop — the embedding-space
        analogue of colour jitter, so a slide's stain or scanner shift is no longer a cue
        shared by all its crops; ``feature_noise``: i.i.d. per-tile Gaussian noise.
        """
        cfg = self.cfg
        if cfg.feature_gain > 0:
            x.mul_(1.0 + float(rng.uniform(-cfg.feature_gain, cfg.feature_gain)))
        if spread is None:
            return x
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        if cfg.feature_shift > 0:
            x += torch.randn(x.shape[1], generator=gen).mul_(cfg.feature_shift * spread)
        if cfg.feature_noise > 0:
            x += torch.randn(x.shape, generator=gen).mul_(cfg.feature_noise * spread)
        return x

    def _finish(
        self,
        feats: torch.Tensor,
        pos_grid: np.ndarray,
        rows: np.ndarray,
        spread: torch.Tensor | None,
        is_global: bool,
        rng: np.random.Generator,
    ) -> dict:
        cfg = self.cfg
        if cfg.token_drop > 0 and len(rows) > 1:
            keep = max(1, int(round(len(rows) * (1 - cfg.token_drop))))
            rows = np.sort(rng.choice(rows, size=keep, replace=False))
        coords = pos_grid[rows]
        coords = coords - coords.min(axis=0)
        k = int(rng.integers(4)) if cfg.rot90 else 0
        flip = bool(rng.integers(2)) if cfg.flip else False
        if k or flip:
            coords = _rotate_flip(coords, k, flip)
        if cfg.translate > 0:  # a random origin: absolute positions carry no cue
            coords = coords + rng.integers(0, cfg.translate + 1, 2)
        perm = spatial_order(coords, cfg.order)
        rows, coords = rows[perm], coords[perm]
        x = feats[torch.from_numpy(rows)]
        x = self._jitter(x, spread, rng)
        crop = {
            "features": x,
            "coords": torch.from_numpy(coords.astype(np.int64)),
            "rows": torch.from_numpy(rows.astype(np.int64)),
        }
        if is_global:
            mask = sample_mask(
                coords,
                rng,
                probability=cfg.mask_probability,
                ratio=cfg.mask_ratio,
                min_block_tiles=cfg.mask_min_block_tiles,
                max_block_tiles=cfg.mask_max_block_tiles,
            )
            crop["ibot_mask"] = torch.from_numpy(mask)
            # the arrangement contrast's negative (ssl/arrangement_loss.py): the same tiles,
            # their positions permuted among them. A child generator draws it, so every other
            # draw of the slide is unchanged, and a batch split into micro-batches or ranks
            # sees the same permutations as the whole.
            order = rng.spawn(1)[0].permutation(len(rows))
            crop["shuffled_coords"] = crop["coords"][torch.from_numpy(order)]
        return crop
