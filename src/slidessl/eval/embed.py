"""One embedding per slide from any encoder, through one pipe, so baselines compare fairly.

``ENCODER`` is one of (:func:`from_spec`, the one place a spec is parsed, gives its
:class:`~slidessl.eval.embedder.Embedder`):

- a teacher export folder / ``model.safetensors`` / training checkpoint
  (``slidessl.load_encoder``);
- ``meanpool``: the mean of the slide's tile features (no model);
- ``random`` / ``random:PRESET`` / ``random:PATH``: a randomly initialised encoder of a
  preset (default ``tiny``) or of the architecture of an export at PATH, with the input dim
  taken from the data (seeded: the same random weights every run);
- ``prototypes[:K[:kmeans|gmm]]`` / ``cooc[:K[:...]]``: the label-free prototype baselines
  of :mod:`slidessl.eval.prototypes`, fitted on the tiles of the slides being embedded
  (K = 16 k-means prototypes by default; seeded);
- ``gigapath:PATH``: a local Prov-GigaPath ``slide_encoder.pth``: in :func:`run_embed`, the
  published forward on the files as they are (:mod:`slidessl.eval.gigapath_embed`: row
  order, Prov-GigaPath positions; its own pooling names). ``build_embedder`` gives the
  loaded encoder for slidessl's own conventions (spatial order, origin-free grid).

Pooling of slidessl encoders: see :mod:`slidessl.eval.encoder_embed`.

:func:`run_embed` is the one resume / write loop: every slide is read whole up to
``max_tiles`` (a seeded, spatially uniform subsample above it), in spatial order (slidessl
encoders), by DataLoader worker processes while the model runs, in eval mode under
``torch.no_grad``: deterministic. Slides already in the output file are skipped (resume).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from slidessl.cpus import data_workers
from slidessl.data.manifest import Manifest, load_manifest
from slidessl.eval.embed_io import EmbeddingWriter, read_embeddings
from slidessl.eval.embedder import ORDER, Embedder, MeanPool
from slidessl.eval.encoder_embed import (
    POOLINGS,
    EncoderEmbedder,
    pad_batch,
    parse_pooling,
    region_embedding,
    regions_of,
)
from slidessl.eval.gigapath_embed import GigapathEmbedder
from slidessl.eval.prototypes import KINDS as PROTOTYPE_KINDS
from slidessl.eval.prototypes import PrototypeEmbedder
from slidessl.eval.slides import read_slides
from slidessl.progress import progress as progress_bar

__all__ = [
    "ORDER",
    "POOLINGS",
    "as_embedder",
    "build_embedder",
    "embed_batch",
    "embed_items",
    "from_spec",
    "maps_path",
    "pad_batch",
    "parse_pooling",
    "pca_whiten",
    "region_embedding",
    "regions_of",
    "run_embed",
]

log = logging.getLogger(__name__)


def from_spec(
    spec: str,
    feature_dim: int | None = None,
    seed: int = 0,
    *,
    pooling: str = "auto",
    extrapolate: bool = False,
) -> Embedder:
    """The :class:`~slidessl.eval.embedder.Embedder` of ``ENCODER`` spec ``spec`` (see the
    module docstring). ``pooling="auto"``: ``cls`` for ``gigapath:PATH`` (the published
    readout), ``mean`` otherwise; ``meanpool`` and the prototype baselines pool nothing
    (``none``). With ``feature_dim`` a random init is built at once for that input dim (and
    ``gigapath:PATH`` refuses another); otherwise :meth:`Embedder.prepare` does it on the
    cohort. ``seed`` seeds a random init and a prototype fit."""
    head, _, arg = spec.partition(":")
    if head == "gigapath":
        emb = GigapathEmbedder(arg, "cls" if pooling == "auto" else pooling, extrapolate)
    else:
        pooling = "mean" if pooling == "auto" else pooling
        parse_pooling(pooling)
        if spec == "meanpool":
            emb = MeanPool()
        elif head in PROTOTYPE_KINDS:
            emb = PrototypeEmbedder.from_spec(spec, seed)
        elif head == "random":
            emb = EncoderEmbedder.random(spec, arg, seed, pooling)
        else:
            emb = EncoderEmbedder.load(spec, pooling)
    if feature_dim is not None:
        emb.set_input_dim(feature_dim)
    return emb


def build_embedder(spec: str, in_dim: int, seed: int = 0):
    """``(encoder or None, description)`` of an encoder spec or ``meanpool`` (``None``:
    mean pooling of tile features), for :func:`embed_items` on preloaded slides."""
    emb = from_spec(spec, in_dim, seed)
    if isinstance(emb, PrototypeEmbedder):
        raise ValueError(f"{spec}: prototypes are fitted: use PrototypeEmbedder.fit_items")
    return emb.module, emb.description


def as_embedder(encoder, pooling: str = "cls") -> Embedder:
    """``encoder`` as an :class:`~slidessl.eval.embedder.Embedder`: itself if it is one,
    mean pooling for ``None``, a slidessl encoder module read out by ``pooling``."""
    if isinstance(encoder, Embedder):
        return encoder
    return MeanPool() if encoder is None else EncoderEmbedder(encoder, pooling)


def embed_batch(encoder, items: list[dict], pooling: str = "cls") -> np.ndarray:
    """(B, E) slide vectors for a list of slide dicts (``features``, ``grid``); ``encoder``
    as :func:`as_embedder` takes it."""
    return as_embedder(encoder, pooling).embed(items)


def embed_items(encoder, items: list[dict], pooling: str = "cls", batch_size: int = 4):
    """``(slide_ids, (n, E) vectors)`` for preloaded slide dicts (batched by similar length)."""
    embedder = as_embedder(encoder, pooling)
    order = np.argsort([len(it["features"]) for it in items], kind="stable")
    ids, vecs = [], []
    for s in range(0, len(order), batch_size):
        batch = [items[int(i)] for i in order[s : s + batch_size]]
        vecs.append(embedder.embed(batch))
        ids += [it["slide_id"] for it in batch]
    return ids, np.concatenate(vecs)


def run_embed(
    encoder_spec: str,
    manifest,
    out: str | Path,
    pooling: str = "auto",
    max_tiles: int | None | str = "auto",
    batch_size: int = 4,
    seed: int = 0,
    on_bad_slide: str = "error",
    progress: bool = True,
    gigapath_extrapolate: bool = False,
    maps: int = 0,
    workers: int = 2,
) -> dict:
    """Embed every slide of ``manifest`` into ``out``; returns a summary dict.

    A slide's vector depends on (encoder, slide file, options) only: a slide above
    ``max_tiles`` is read as a spatially uniform subsample seeded by ``(seed, slide id)``.
    ``max_tiles="auto"``: every tile for ``meanpool`` / ``prototypes`` / ``cooc`` (cheap),
    8,192 for encoders (``gigapath:PATH`` reads every tile). The file records every option
    that changes a vector (``spec``, ``pooling``, ``max_tiles``, ``seed``, ``order``,
    ``encoder_digest``; ``gigapath:PATH``: ``spec``, ``pooling``, ``convention``), and an
    existing file is resumed (its slides kept, the others added) only under the same ones.
    ``capped_slides`` says how many of its slides were capped. Slides are read by
    ``workers`` DataLoader processes (at most the usable CPUs minus one). With ``maps`` > 0,
    that many slides' attention / PCA maps are stored in ``OUT.maps.npz`` (what ``slidessl
    report`` draws; slidessl encoders with attention blocks only), keyed by slide and added
    to on resume."""
    embedder = from_spec(encoder_spec, seed=seed, pooling=pooling, extrapolate=gigapath_extrapolate)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    out = Path(out)
    if max_tiles == "auto":  # cheap label-free baselines read every tile; encoders cap
        max_tiles = embedder.auto_max_tiles
    workers = data_workers(workers)
    # the whole cohort, as the embedder reads it
    ds = embedder.open(manifest, max_tiles, seed, on_bad_slide)
    embedder.prepare(ds, workers)  # e.g. fitted on the whole cohort (no labels) first
    done = _resumable(out, embedder.options(max_tiles, seed))
    if not done and maps_path(out).exists():  # a new file: no maps of an older run beside it
        maps_path(out).unlink()
    todo = [i for i, sid in enumerate(ds.slide_ids) if sid not in done]
    summary = {
        "out": str(out),
        "skipped_existing": len(done),
        "written": 0,
        "bad_slides": list(ds.skipped),
    }
    if not todo:
        log.info("%s: all %d slides already embedded", out, len(done))
        return summary
    # Similar lengths in a batch waste less padding; order does not change the vectors.
    order = sorted(todo, key=lambda i: ds.num_tiles[i])
    size = embedder.batch_size or batch_size
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    vecs = None
    slides = read_slides(ds, batches, workers)  # workers forked before the file is opened
    with EmbeddingWriter(out, embedder.file_attrs(max_tiles, seed)) as writer:
        bar = progress_bar(
            total=len(order), desc=f"embed {Path(encoder_spec).name}", disable=not progress
        )
        for batch, items in zip(batches, slides):
            if items:
                vecs = embedder.embed(items)
                writer.write([it["slide_id"] for it in items], vecs)
                summary["written"] += len(items)
            bar.update(len(batch))
        bar.close()
        if embedder.counts_capped:
            summary["capped_slides"] = _count_capped(ds, done | set(writer.written), max_tiles, out)
            writer.set_attrs({"capped_slides": summary["capped_slides"]})
    summary["bad_slides"] = list(ds.skipped)
    summary["dim"] = int(vecs.shape[1]) if vecs is not None else None
    if maps > 0 and summary["written"]:
        from slidessl.eval.maps import pick_map_items, write_maps

        # the same slides of the manifest whether or not the run was resumed; slides whose
        # maps the file already holds are kept, the others added
        picked = pick_map_items(list(range(len(ds))), maps)
        written = write_maps(maps_path(out), embedder.map_encoder, picked, ds.__getitem__)
        summary["maps"] = None if written is None else str(written)
    return summary


def _resumable(out: Path, options: dict) -> set[str]:
    """The slide ids ``out`` already holds, after checking that it was written under
    ``options`` (a file made under others would mix vectors that differ)."""
    if not out.exists():
        return set()
    ids, _, attrs = read_embeddings(out)
    for key, want in options.items():
        if str(attrs.get(key)) != str(want):
            raise ValueError(
                f"{out}: holds embeddings made with {key}={attrs.get(key)!r}, not {want!r} "
                f"(this run has {want!r}; its vectors would differ: write to a new file, or "
                "rerun with the options the file records)"
            )
    return set(ids)


def _count_capped(ds, in_file: set[str], max_tiles: int | None, out: Path) -> int:
    """How many slides of the file were capped to ``max_tiles`` (also recorded), logged."""
    capped = [
        n
        for sid, n in zip(ds.slide_ids, ds.num_tiles)
        if sid in in_file and max_tiles is not None and n > max_tiles
    ]
    if capped:
        log.info(
            "%s: %d of %d slides had more than %d tiles and were read as a spatially uniform "
            "subsample of %d (seeded by slide id; --max-tiles to change)",
            out,
            len(capped),
            len(in_file),
            max_tiles,
            max_tiles,
        )
    return len(capped)


def maps_path(out: str | Path) -> Path:
    """Where the slide maps of embeddings file ``out`` go: ``OUT.maps.npz`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".maps.npz")


def pca_whiten(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """Label-free PCA whitening of slide vectors (all components a cohort of ``n`` slides
    supports, ``min(n - 1, E)``, each scaled to unit variance): what a random-init vector
    can gain without training, the bar a pretrained vector must clear too."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    n_comp = max(1, min(X.shape[0] - 1, X.shape[1]))
    return (
        PCA(n_components=n_comp, whiten=True, random_state=seed).fit_transform(X).astype(np.float32)
    )
