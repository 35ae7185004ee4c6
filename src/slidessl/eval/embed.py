"""One embedding per slide from any encoder, through one pipe, so baselines compare fairly.

``ENCODER`` is one of:

- a teacher export folder / ``model.safetensors`` / training checkpoint
  (``slidessl.load_encoder``);
- ``meanpool``: the mean of the slide's tile features (no model);
- ``random`` / ``random:PRESET`` / ``random:PATH``: a randomly initialised encoder of a
  preset (default ``tiny``) or of the architecture of an export at PATH, with the input dim
  taken from the data (seeded: the same random weights every run);
- ``prototypes[:K[:kmeans|gmm]]`` / ``cooc[:K[:...]]``: the label-free prototype baselines
  of :mod:`slidessl.eval.prototypes`, fitted on the tiles of the slides being embedded
  (K = 16 k-means prototypes by default; seeded);
- ``gigapath:PATH``: a local Prov-GigaPath ``slide_encoder.pth``: :func:`run_embed` hands it
  to :mod:`slidessl.eval.gigapath_embed`, the published forward on the files as they are
  (row order, Prov-GigaPath positions; its own pooling names). ``build_embedder`` gives the
  loaded encoder for slidessl's own conventions (spatial order, origin-free grid).

Pooling: ``cls`` (final CLS), ``mean`` (mean of the final tokens over real tiles),
``pooled`` (the encoder's configured pool), ``layers:I,J,...`` (the concatenation of the
pooled outputs of blocks I, J, ... - negative indices count from the last block), or
``regions:S[,T...]`` (the mean over the slide's S x S-tile regions, at a stride of S / 2,
of each region's CLS, concatenated over the sides given: the readout of an encoder
pretrained on region-sized crops, as HIPT reads region embeddings).

Every slide is read whole up to ``max_tiles`` (a seeded, spatially uniform subsample above
it), in spatial order, in eval mode under ``torch.no_grad``: deterministic. Slides are
batched with padding masks. Slides already in the output file are skipped (resume).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from slidessl.data.collate import pad_crops
from slidessl.eval.embed_io import EmbeddingWriter, read_embeddings
from slidessl.eval.prototypes import PrototypeEmbedder, is_prototype_spec
from slidessl.models.encoder import readout
from slidessl.progress import progress as progress_bar

log = logging.getLogger(__name__)

ORDER = "hilbert"  # token order of a whole slide at embedding time
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


def build_embedder(spec: str, in_dim: int, seed: int = 0):
    """``(encoder or None, description)``; ``None`` means mean pooling of tile features."""
    if spec == "meanpool":
        return None, "meanpool"
    if spec == "random" or spec.startswith("random:"):
        from slidessl.models.encoder import PRESETS, SlideEncoder, build_encoder

        arg = spec.partition(":")[2] or "tiny"
        torch.manual_seed(seed)
        if arg in PRESETS:
            enc = build_encoder(arg, in_dim=in_dim)
        elif Path(arg).exists():
            from slidessl import load_encoder

            cfg = dict(load_encoder(arg).config)
            cfg["in_dim"] = in_dim
            torch.manual_seed(seed)
            enc = SlideEncoder(**cfg)
        else:
            raise ValueError(f"{spec}: {arg!r} is neither a preset {sorted(PRESETS)} nor a path")
        return enc.eval(), f"random:{arg}:seed{seed}"
    if spec.startswith("gigapath:"):
        from slidessl.models.gigapath import load_gigapath

        path = spec.partition(":")[2]
        encoder = load_gigapath(path).eval()
        if encoder.in_dim != in_dim:
            raise ValueError(
                f"{path}: the Prov-GigaPath slide encoder takes {encoder.in_dim}-dim tile "
                f"features (its own tile encoder's), but these slides have {in_dim}-dim ones"
            )
        return encoder, f"gigapath:{Path(path).resolve()}"
    from slidessl import load_encoder

    if not Path(spec).exists():
        raise ValueError(
            f"{spec}: no such encoder (expected a teacher folder, checkpoint, meanpool, "
            "random[:PRESET] or gigapath:PATH)"
        )
    return load_encoder(spec).eval(), str(Path(spec).resolve())


def _spec_key(spec: str) -> str:
    """The encoder spec with paths resolved: what a resumed run must match."""
    if spec == "meanpool" or spec == "random" or spec.startswith("random:"):
        arg = spec.partition(":")[2]
        return f"random:{Path(arg).resolve()}" if arg and Path(arg).exists() else spec
    if spec.startswith("gigapath:"):
        return f"gigapath:{Path(spec.partition(':')[2]).resolve()}"
    return str(Path(spec).resolve())


def pad_batch(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slide dicts -> features (B, N, D), grid (B, N, 2), padding_mask (B, N) True = pad."""
    batch = pad_crops([{"features": it["features"], "coords": it["grid"]} for it in items])
    return batch["features"], batch["coords"], batch["padding_mask"]


@torch.no_grad()
def embed_batch(encoder, items: list[dict], pooling: str = "cls") -> np.ndarray:
    """(B, E) slide vectors for a list of slide dicts (``features``, ``grid``)."""
    if encoder is None:
        return np.stack([it["features"].double().mean(0).float().numpy() for it in items])
    if isinstance(encoder, PrototypeEmbedder):
        return encoder(items)
    kind, layers = parse_pooling(pooling)
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


def embed_items(encoder, items: list[dict], pooling: str = "cls", batch_size: int = 4):
    """``(slide_ids, (n, E) vectors)`` for preloaded slide dicts (batched by similar length)."""
    order = np.argsort([len(it["features"]) for it in items], kind="stable")
    ids, vecs = [], []
    for s in range(0, len(order), batch_size):
        batch = [items[int(i)] for i in order[s : s + batch_size]]
        vecs.append(embed_batch(encoder, batch, pooling))
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
) -> dict:
    """Embed every slide of ``manifest`` into ``out``; returns a summary dict.

    A slide's vector depends on (encoder, slide file, options) only: a slide above
    ``max_tiles`` is read as a spatially uniform subsample seeded by ``(seed, slide id)``.
    ``max_tiles="auto"``: every tile for ``meanpool`` / ``prototypes`` / ``cooc`` (cheap),
    8,192 for encoders. The file records every option that changes a vector (``spec``,
    ``pooling``, ``max_tiles``, ``seed``, ``order``, ``encoder_digest``), and an existing file
    is resumed (its slides kept, the others added) only under the same ones. ``capped_slides``
    says how many of its slides were capped. With ``maps`` > 0, that many slides' attention /
    PCA maps are stored in ``OUT.maps.npz`` (what ``slidessl report`` draws; encoders with
    attention blocks only), keyed by slide and added to on resume."""
    if pooling == "auto":  # the published readout of Prov-GigaPath; the token mean otherwise
        pooling = "cls" if encoder_spec.startswith("gigapath:") else "mean"
    if encoder_spec.startswith("gigapath:"):
        from slidessl.eval.gigapath_embed import run_gigapath_embed

        return run_gigapath_embed(
            encoder_spec, manifest, out, pooling, on_bad_slide, progress, gigapath_extrapolate
        )

    from slidessl.data.dataset import SlideDataset
    from slidessl.data.manifest import Manifest, load_manifest

    parse_pooling(pooling)
    no_encoder = encoder_spec == "meanpool" or is_prototype_spec(encoder_spec)
    if no_encoder:
        pooling = "none"  # no encoder: nothing to pool (recorded as such)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    out = Path(out)
    if max_tiles == "auto":  # cheap label-free baselines read every tile; encoders cap
        max_tiles = None if no_encoder else 8192
    # the whole cohort, each capped slide's subsample keyed by its id (not its position):
    # a slide's vector is a function of (encoder, slide file, options) only
    ds = SlideDataset(
        manifest,
        max_tiles=max_tiles,
        order=ORDER,
        on_bad_slide=on_bad_slide,
        seed=seed,
        cap_key="slide_id",
    )
    spec_key = _spec_key(encoder_spec)
    if is_prototype_spec(encoder_spec):
        # fitted on the whole cohort (no labels), before any slide is embedded: the key
        # names the fit, so a resumed file must come from the same prototypes
        encoder = PrototypeEmbedder.fit(encoder_spec, ds, seed)
        spec_key = desc = f"{encoder_spec}:seed{seed}:{encoder.model.digest()}"
    else:
        encoder, desc = build_embedder(encoder_spec, ds.feature_dim, seed)
    options = {
        "spec": spec_key,
        "pooling": pooling,
        "max_tiles": -1 if max_tiles is None else int(max_tiles),
        "seed": int(seed),
        "order": ORDER,
        "encoder_digest": encoder_digest(encoder),
    }
    done: set[str] = set()
    if out.exists():
        ids, _, attrs = read_embeddings(out)
        done = set(ids)
        for key, want in options.items():
            if str(attrs.get(key)) != str(want):
                raise ValueError(
                    f"{out}: holds embeddings made with {key}={attrs.get(key)!r}, this run "
                    f"has {want!r}; its vectors would differ: write to a new file (or rerun "
                    "with the options the file records)"
                )
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
    vecs = None
    with EmbeddingWriter(out, {"encoder": desc, **options}) as writer:
        bar = progress_bar(
            total=len(order), desc=f"embed {Path(encoder_spec).name}", disable=not progress
        )
        for s in range(0, len(order), batch_size):
            items = [ds[i] for i in order[s : s + batch_size]]
            items = [it for it in items if it is not None]
            if items:
                vecs = embed_batch(encoder, items, pooling)
                writer.write([it["slide_id"] for it in items], vecs)
                summary["written"] += len(items)
            bar.update(len(order[s : s + batch_size]))
        bar.close()
        # how many slides of the file were capped, and to how many tiles
        in_file = done | set(writer.written)
        capped = [
            n
            for sid, n in zip(ds.slide_ids, ds.num_tiles)
            if sid in in_file and max_tiles is not None and n > max_tiles
        ]
        writer.set_attrs({"capped_slides": len(capped)})  # to max_tiles, also recorded
    summary["bad_slides"] = list(ds.skipped)
    summary["capped_slides"] = len(capped)
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
    summary["dim"] = int(vecs.shape[1]) if vecs is not None else None
    if maps > 0 and summary["written"]:
        from slidessl.eval.maps import pick_map_items, write_maps

        # the same slides of the manifest whether or not the run was resumed; slides whose
        # maps the file already holds are kept, the others added
        picked = pick_map_items(list(range(len(ds))), maps)
        written = write_maps(maps_path(out), encoder, picked, ds.__getitem__)
        summary["maps"] = None if written is None else str(written)
    return summary


def encoder_digest(encoder) -> str:
    """A short digest of what computes the vectors: the weights of a module (sha256 over
    its state dict), the fit of a prototype embedder, or ``meanpool``."""
    if encoder is None:
        return "meanpool"
    if isinstance(encoder, PrototypeEmbedder):
        return encoder.model.digest()
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
