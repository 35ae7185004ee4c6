"""``slidessl embed gigapath:PATH``: Prov-GigaPath's own slide embeddings of the user's files.

:class:`GigapathEmbedder` is the embedder of ``gigapath:PATH``, run by ``slidessl embed``'s
one resume / write loop (:func:`slidessl.eval.embed.run_embed`); it reads its slides with
:class:`GigapathSlides`, the published pipeline's conventions rather than slidessl's.

The vectors are those of the published pipeline (``gigapath.slide_encoder.create_model`` +
``gigapath.pipeline.run_inference_with_slide_encoder``) on the same HDF5 file, in float32:

- every tile, in the file's row order (no cap, no spatial re-ordering: LongNet cuts its
  segments on that order), one slide per forward (the published code has no padding mask);
- positions as Prov-GigaPath computes them, in the file's own frame (no origin shift):
  ``floor(coords / 256)`` for Prov-GigaPath files (px at the tiling level, 256-px tiles);
  for TRIDENT / CLAM / other files in level-0 px, one tile step (TRIDENT's
  ``patch_size_level0``, else the manifest / option / inferred stride) is one 256-px unit:
  ``floor(coords / step)``. The rule used is logged once per kind of file;
- :func:`slidessl.models.gigapath.gigapath_forward`: table rows ``gx * 1000 + gy + 1``,
  CLS plus the zero row, torchscale's zero-padded dilated attention. A position outside the
  1000 x 1000 table is an error naming the file unless ``extrapolate``
  (``--gigapath-extrapolate``) continues the table's sin-cos formula.

Pooling (``--pooling``), ``I`` indexing the pipeline's ``layer_{I}_embed`` (0 = the block
input, ``depth`` = the last block, negatives from the end):

==================  =====================================================================
``cls``, ``pooled``  ``last_layer_embed`` with ``global_pool=False`` (the pipeline's default)
``mean``             ``last_layer_embed`` with ``global_pool=True``
``layers:I,J``       ``layer_I_embed``, ``layer_J_embed`` concatenated (``global_pool=False``)
``mean-layers:I,J``  the same with ``global_pool=True``
``forward-cls``      ``LongNetViT.forward(x, coords)[0]`` (``all_layer_embed=False``: after
                     the encoder LayerNorm), ``global_pool=False``
``forward-mean``     the same with ``global_pool=True``
==================  =====================================================================
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slidessl.data.dataset import SlideSource
from slidessl.data.formats import SlideError, open_slide
from slidessl.eval.embedder import Embedder
from slidessl.models.gigapath import (
    GIGAPATH_TILE_PX,
    gigapath_pool,
    load_gigapath,
    published_states,
)
from slidessl.models.posenc import check_gigapath_table

__all__ = [
    "CONVENTION",
    "GigapathEmbedder",
    "GigapathSlides",
    "embed_gigapath_slide",
    "gigapath_positions",
    "parse_gigapath_pooling",
]

log = logging.getLogger(__name__)

CONVENTION = "prov-gigapath"  # the embeddings file attribute that marks this path
_SIMPLE = {
    "cls": ("last", False),
    "pooled": ("last", False),
    "mean": ("last", True),
    "forward-cls": ("forward", False),
    "forward-mean": ("forward", True),
}
_LAYERS = (("layers:", False), ("mean-layers:", True))
_STRIDE_FROM = {
    "attribute": "patch_size_level0",
    "manifest": "the manifest's stride",
    "option": "the stride option",
    "inferred": "inferred: the most common coordinate gap",
}


def parse_gigapath_pooling(
    pooling: str, n_outputs: int | None = None
) -> tuple[str, bool, list[int] | None]:
    """``(what, global_pool, layers)`` with ``what`` in ``last``, ``layers``, ``forward``;
    with ``n_outputs`` (``depth + 1``) layer indices are checked against it."""
    if pooling in _SIMPLE:
        return (*_SIMPLE[pooling], None)
    for prefix, global_pool in _LAYERS:
        if pooling.startswith(prefix):
            try:
                layers = [int(t) for t in pooling[len(prefix) :].split(",") if t.strip()]
            except ValueError:
                layers = []
            if not layers:
                break
            bad = [i for i in layers if n_outputs is not None and not -n_outputs <= i < n_outputs]
            if bad:
                raise ValueError(
                    f"pooling {pooling!r}: layer(s) {bad} do not exist; this encoder has "
                    f"layer_0_embed .. layer_{n_outputs - 1}_embed"
                )
            return "layers", global_pool, layers
    raise ValueError(
        f"unknown pooling {pooling!r} for gigapath:PATH; use cls, pooled, mean, forward-cls, "
        "forward-mean, layers:I,J or mean-layers:I,J (I: the pipeline's layer_I_embed, "
        "0 = the block input)"
    )


def gigapath_positions(rec) -> tuple[np.ndarray, str]:
    """Prov-GigaPath table positions ``(gx, gy)`` (N, 2) int64 of a
    :class:`~slidessl.data.formats.SlideRecord`'s tiles, in file order, and the rule used."""
    c = np.asarray(rec.coords, dtype=np.float64)
    if rec.source_format == "gigapath" and rec.stride_source == "inferred":
        grid = np.floor(c / GIGAPATH_TILE_PX)
        rule = (
            f"Prov-GigaPath coords (px at the tiling level): positions floor(coords / "
            f"{GIGAPATH_TILE_PX}), no origin shift"
        )
    else:
        step = float(rec.stride)
        grid = np.floor(c / step + 1e-6)
        rule = (
            f"{rec.source_format} coords: one tile step of {step:g} coordinate units "
            f"({_STRIDE_FROM.get(rec.stride_source, rec.stride_source)}) = one "
            f"{GIGAPATH_TILE_PX}-px Prov-GigaPath tile: positions floor(coords / {step:g}), "
            "no origin shift"
        )
    return grid.astype(np.int64), rule


@torch.no_grad()
def embed_gigapath_slide(encoder, features, grid, pooling: str = "cls", extrapolate=False):
    """One slide's vector (float32 numpy) from ``features`` (N, D) and table positions
    ``grid`` (N, 2), tokens in the order given; see the module docstring for ``pooling``."""
    what, global_pool, layers = parse_gigapath_pooling(pooling, encoder.depth + 1)
    x = torch.as_tensor(features, dtype=torch.float32)[None]
    g = torch.as_tensor(grid, dtype=torch.long)[None]
    states = published_states(encoder, x, g, extrapolate)
    if what == "last":
        vec = gigapath_pool(encoder, states[-1], global_pool)
    elif what == "forward":
        last = states[-1] if encoder.encoder_norm is None else encoder.encoder_norm(states[-1])
        vec = gigapath_pool(encoder, last, global_pool)
    else:
        vec = torch.cat([gigapath_pool(encoder, states[i], global_pool) for i in layers], -1)
    return vec[0].float().numpy()


class GigapathSlides(SlideSource):
    """The slides of a manifest as the published pipeline reads them: every tile, in file
    row order, with :func:`gigapath_positions`. Each slide is checked once here (header,
    the tile-feature dim ``in_dim`` of the encoder at ``ckpt``, positions inside the
    1000 x 1000 table unless ``extrapolate``), the position rule logged once per kind of
    file; a bad slide
    raises its :class:`~slidessl.data.formats.SlideError` (``on_bad_slide="error"``) or is
    logged, listed in ``skipped`` and left out (``"skip"``). Fork-safe (no open file), as
    :func:`slidessl.eval.slides.read_slides` needs."""

    def __init__(self, manifest, in_dim: int, ckpt: Path, extrapolate=False, on_bad_slide="error"):
        if on_bad_slide not in ("error", "skip"):
            raise ValueError(f"on_bad_slide must be 'error' or 'skip', got {on_bad_slide!r}")
        self.on_bad_slide, self.feature_dim = on_bad_slide, in_dim
        self.entries, self.num_tiles, self.skipped = [], [], []
        rules_seen: set[str] = set()
        for entry in manifest.entries:
            try:
                rec = self._open(entry)
                if rec.feature_dim != in_dim:
                    raise SlideError(
                        rec.path,
                        f"the Prov-GigaPath slide encoder {ckpt} takes {in_dim}-dim "
                        f"tile features (its own tile encoder's), but this file has "
                        f"{rec.feature_dim}-dim ones",
                    )
                grid, rule = gigapath_positions(rec)
                try:
                    n_out = check_gigapath_table(torch.from_numpy(grid), extrapolate)
                except ValueError as exc:
                    raise SlideError(rec.path, str(exc)) from exc
            except SlideError as exc:
                self.bad_slide(entry.slide_id, exc)
                continue
            if rule not in rules_seen:
                rules_seen.add(rule)
                log.info("gigapath:%s: %s (first: %s)", Path(ckpt).name, rule, rec.path)
            if n_out:
                log.warning(
                    "%s: %d tiles outside the 1000 x 1000 position table, sin-cos extrapolated",
                    rec.path,
                    n_out,
                )
            shared = len(grid) - len(np.unique(grid, axis=0))
            if shared:
                log.warning(
                    "%s: %d tiles share a Prov-GigaPath position with another tile (the "
                    "published model does the same)",
                    rec.path,
                    shared,
                )
            self.entries.append(entry)
            self.num_tiles.append(rec.num_tiles)

    @staticmethod
    def _open(entry):
        return open_slide(
            entry.path,
            slide_id=entry.slide_id,
            stride=entry.stride,
            stride_source="manifest" if entry.stride else "option",
        )

    def bad_slide(self, slide_id: str, exc: SlideError) -> None:
        if self.on_bad_slide == "error":
            raise exc
        self.skipped.append((slide_id, exc.problem))
        log.warning("skipping slide %r: %s", slide_id, exc)

    def load(self, index: int) -> dict:
        """Slide ``index``: ``features`` (N, D) float32 and ``grid`` (N, 2) table positions,
        in file row order."""
        entry = self.entries[index]
        rec = self._open(entry)
        grid, _ = gigapath_positions(rec)
        return {
            "slide_id": entry.slide_id,
            "index": index,
            "features": torch.as_tensor(rec.read_features(), dtype=torch.float32),
            "grid": torch.from_numpy(grid),
            "num_tiles": rec.num_tiles,
        }


class GigapathEmbedder(Embedder):
    """``gigapath:PATH``: the published forward of a local ``slide_encoder.pth``, one slide
    per forward, every tile in file row order (``--max-tiles`` and ``--batch-size`` do not
    apply); see the module docstring for ``pooling``. The file records ``encoder``, ``spec``,
    ``pooling``, ``max_tiles`` (-1), ``convention`` and ``extrapolate``; a resumed file must
    match ``spec``, ``pooling`` and ``convention``."""

    batch_size = 1
    counts_capped = False
    map_encoder = None  # slide maps are drawn in slidessl's convention only

    def __init__(self, path: str, pooling: str = "cls", extrapolate: bool = False):
        if not path:
            raise ValueError(f"{'gigapath:' + path!r}: expected gigapath:PATH")
        parse_gigapath_pooling(pooling)
        self.path, self.pooling, self.extrapolate = Path(path), pooling, bool(extrapolate)
        self.module = load_gigapath(self.path)
        parse_gigapath_pooling(pooling, self.module.depth + 1)
        self.key = self.description = f"gigapath:{self.path.resolve()}"

    def set_input_dim(self, dim: int) -> None:
        if self.module.in_dim != dim:
            raise ValueError(
                f"{self.path}: the Prov-GigaPath slide encoder takes {self.module.in_dim}-dim "
                f"tile features (its own tile encoder's), but these slides have {dim}-dim ones"
            )

    def open(self, manifest, max_tiles, seed, on_bad_slide) -> GigapathSlides:
        log.info(
            "gigapath:%s: Prov-GigaPath's published forward on every tile of each slide in "
            "file row order, one slide at a time (--max-tiles and --batch-size do not apply)",
            self.path,
        )
        return GigapathSlides(
            manifest, self.module.in_dim, self.path, self.extrapolate, on_bad_slide
        )

    def prepare(self, dataset, workers: int = 0) -> None:
        """Nothing: every slide was checked against the encoder when it was opened."""

    def options(self, max_tiles, seed) -> dict:
        return {"spec": self.key, "pooling": self.pooling, "convention": CONVENTION}

    def file_attrs(self, max_tiles, seed) -> dict:
        return {
            "encoder": self.description,
            "spec": self.key,
            "pooling": self.pooling,
            "max_tiles": -1,
            "convention": CONVENTION,
            "extrapolate": int(self.extrapolate),
        }

    def embed(self, items: list[dict]) -> np.ndarray:
        return np.stack(
            [
                embed_gigapath_slide(
                    self.module, it["features"], it["grid"], self.pooling, self.extrapolate
                )
                for it in items
            ]
        )
