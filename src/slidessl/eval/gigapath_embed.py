"""``slidessl embed gigapath:PATH``: Prov-GigaPath's own slide embeddings of the user's files.

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

from slidessl.eval.embed_io import EmbeddingWriter, read_embeddings
from slidessl.models.gigapath import (
    GIGAPATH_TILE_PX,
    gigapath_pool,
    load_gigapath,
    published_states,
)
from slidessl.models.posenc import check_gigapath_table
from slidessl.progress import progress as progress_bar

__all__ = [
    "CONVENTION",
    "embed_gigapath_slide",
    "gigapath_positions",
    "parse_gigapath_pooling",
    "run_gigapath_embed",
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


def run_gigapath_embed(
    encoder_spec: str,
    manifest,
    out,
    pooling: str = "cls",
    on_bad_slide: str = "error",
    progress: bool = True,
    extrapolate: bool = False,
) -> dict:
    """Embed every slide of ``manifest`` with ``gigapath:PATH`` into ``out`` (resumable);
    returns the same summary dict as :func:`slidessl.eval.embed.run_embed`."""
    from slidessl.data.formats import SlideError, open_slide
    from slidessl.data.manifest import Manifest, load_manifest

    if not encoder_spec.startswith("gigapath:") or not encoder_spec.partition(":")[2]:
        raise ValueError(f"{encoder_spec!r}: expected gigapath:PATH")
    if on_bad_slide not in ("error", "skip"):
        raise ValueError(f"on_bad_slide must be 'error' or 'skip', got {on_bad_slide!r}")
    parse_gigapath_pooling(pooling)
    ckpt = Path(encoder_spec.partition(":")[2])
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    out = Path(out)
    spec_key = f"gigapath:{ckpt.resolve()}"
    done: set[str] = set()
    if out.exists():
        ids, _, attrs = read_embeddings(out)
        for key, want in (("spec", spec_key), ("pooling", pooling), ("convention", CONVENTION)):
            if str(attrs.get(key)) != want:
                raise ValueError(
                    f"{out}: holds embeddings with {key}={attrs.get(key)!r}, not {want!r}; "
                    "write to a new file"
                )
        done = set(ids)
    todo = [e for e in manifest.entries if e.slide_id not in done]
    summary = {"out": str(out), "skipped_existing": len(done), "written": 0, "bad_slides": []}
    if not todo:
        log.info("%s: all %d slides already embedded", out, len(done))
        return summary
    encoder = load_gigapath(ckpt)
    parse_gigapath_pooling(pooling, encoder.depth + 1)
    log.info(
        "gigapath:%s: Prov-GigaPath's published forward on every tile of each slide in file "
        "row order, one slide at a time (--max-tiles and --batch-size do not apply)",
        ckpt,
    )
    attrs = {
        "encoder": f"gigapath:{ckpt.resolve()}",
        "spec": spec_key,
        "pooling": pooling,
        "max_tiles": -1,
        "convention": CONVENTION,
        "extrapolate": int(bool(extrapolate)),
    }
    rules_seen: set[str] = set()
    dim = None
    with EmbeddingWriter(out, attrs) as writer:
        for entry in progress_bar(todo, desc=f"embed gigapath:{ckpt.name}", disable=not progress):
            try:
                rec = open_slide(
                    entry.path,
                    slide_id=entry.slide_id,
                    stride=entry.stride,
                    stride_source="manifest" if entry.stride else "option",
                )
                if rec.feature_dim != encoder.in_dim:
                    raise SlideError(
                        rec.path,
                        f"the Prov-GigaPath slide encoder {ckpt} takes {encoder.in_dim}-dim "
                        f"tile features (its own tile encoder's), but this file has "
                        f"{rec.feature_dim}-dim ones",
                    )
                grid, rule = gigapath_positions(rec)
                try:
                    n_out = check_gigapath_table(torch.from_numpy(grid), extrapolate)
                except ValueError as exc:
                    raise SlideError(rec.path, str(exc)) from exc
                features = rec.read_features()
            except SlideError as exc:
                if on_bad_slide == "error":
                    raise
                summary["bad_slides"].append((entry.slide_id, exc.problem))
                log.warning("skipping slide %r: %s", entry.slide_id, exc)
                continue
            if rule not in rules_seen:
                rules_seen.add(rule)
                log.info("gigapath:%s: %s (first: %s)", ckpt.name, rule, rec.path)
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
            vec = embed_gigapath_slide(encoder, features, grid, pooling, extrapolate)
            writer.write([entry.slide_id], vec[None])
            summary["written"] += 1
            dim = int(vec.shape[0])
    summary["dim"] = dim
    return summary
