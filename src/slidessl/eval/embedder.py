"""What turns slides into slide vectors: the interface every ``slidessl embed`` method has.

An :class:`Embedder` is made from its spec by :func:`slidessl.eval.embed.from_spec` (the one
place a spec string is parsed) and run by :func:`slidessl.eval.embed.run_embed`'s one
resume / write loop. It says

- how its slides are read (:meth:`Embedder.open`: a dataset of slide dicts; slidessl's own
  convention - spatial order, origin-free grid, the cap seeded by ``(seed, slide id)`` -
  unless it has its own, as ``gigapath:PATH``),
- what it needs from the cohort before the first slide (:meth:`Embedder.prepare`: the input
  dim of a random init, the fit of the prototypes),
- what the embeddings file records (:meth:`Embedder.file_attrs`) and what a resumed file
  must match (:meth:`Embedder.options`): ``encoder`` (:attr:`description`), ``spec``
  (:attr:`key`), ``pooling``, ``encoder_digest`` (:attr:`digest`), ...
- and the vectors: :meth:`Embedder.embed` ``(items) -> (B, E) float32``.

This module holds the interface and mean pooling; slidessl encoders are in
:mod:`slidessl.eval.encoder_embed`, the prototype baselines in :mod:`slidessl.eval.prototypes`,
Prov-GigaPath's published pipeline in :mod:`slidessl.eval.gigapath_embed`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np
import torch

from slidessl.data.dataset import SlideDataset

__all__ = ["ENCODER_MAX_TILES", "ORDER", "Embedder", "MeanPool", "module_digest"]

ORDER = "hilbert"  # token order of a whole slide at embedding time
ENCODER_MAX_TILES = 8192  # max_tiles="auto" of an encoder (the cheap baselines read all)


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Embedder(ABC):
    """Slide dicts (``slide_id``, ``features`` (n, D), ``grid`` (n, 2)) -> slide vectors."""

    #: the ``spec`` attribute: the spec with paths resolved (a resumed file must match it)
    key: str = ""
    #: the ``encoder`` attribute: what computed the vectors, in words
    description: str = ""
    #: the ``pooling`` attribute (``none`` where there is nothing to pool)
    pooling: str = "none"
    #: the torch module that computes the vectors, if any (slide maps are drawn from it)
    module: torch.nn.Module | None = None
    #: ``max_tiles="auto"``: every tile (cheap baselines) or a cap (encoders)
    auto_max_tiles: int | None = None
    #: slides per forward this embedder requires (None: the caller's batch size)
    batch_size: int | None = None
    #: whether the file counts its capped slides (``capped_slides``)
    counts_capped: bool = True

    @property
    def digest(self) -> str:
        """The ``encoder_digest`` attribute: what computes the vectors, as a short digest."""
        return module_digest(self.module)

    @property
    def map_encoder(self) -> torch.nn.Module | None:
        """The encoder ``--maps`` draws attention maps of (None: no maps)."""
        return self.module

    def set_input_dim(self, dim: int) -> None:
        """The slides' tile-feature dim is ``dim``: build what depends on it (a random init)
        or refuse it. Nothing by default."""
        return None

    def open(self, manifest, max_tiles: int | None, seed: int, on_bad_slide: str):
        """The cohort as this embedder reads it: slidessl's convention by default (spatial
        order, each capped slide's subsample seeded by ``(seed, slide id)``, not by its
        position: a slide's vector depends on the slide, the encoder and the options only)."""
        return SlideDataset(
            manifest,
            max_tiles=max_tiles,
            order=ORDER,
            on_bad_slide=on_bad_slide,
            seed=seed,
            cap_key="slide_id",
        )

    def prepare(self, dataset, workers: int = 0) -> None:
        """What the embedder needs from the cohort (no labels) before the first slide."""
        self.set_input_dim(dataset.feature_dim)

    def options(self, max_tiles: int | None, seed: int) -> dict:
        """The file attributes that change a vector: a file is resumed only under the same."""
        return {
            "spec": self.key,
            "pooling": self.pooling,
            "max_tiles": -1 if max_tiles is None else int(max_tiles),
            "seed": int(seed),
            "order": ORDER,
            "encoder_digest": self.digest,
        }

    def file_attrs(self, max_tiles: int | None, seed: int) -> dict:
        """Every attribute the embeddings file gets when it is opened."""
        return {"encoder": self.description, **self.options(max_tiles, seed)}

    @abstractmethod
    def embed(self, items: list[dict]) -> np.ndarray:
        """``(B, E)`` float32 slide vectors of ``items``, in their order."""


class MeanPool(Embedder):
    """``meanpool``: the mean of each slide's tile features (float64 sum), no model."""

    key = description = "meanpool"

    @property
    def digest(self) -> str:
        return "meanpool"

    def embed(self, items: list[dict]) -> np.ndarray:
        return np.stack([it["features"].double().mean(0).float().numpy() for it in items])
