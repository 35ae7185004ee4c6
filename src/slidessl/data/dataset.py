"""``SlideDataset``: one item per slide, features and grid in spatial order, capped.

Every slide is validated once at construction (coords, header, feature dim: the features
themselves are not read). With ``on_bad_slide="error"`` the first bad slide raises its
:class:`~slidessl.data.formats.SlideError`; with ``"skip"`` every bad slide is warned
about, listed in ``ds.skipped`` as ``(slide_id, reason)`` and left out of the dataset.
A problem that only shows when features are read (NaN/Inf rows, a truncated dataset)
makes ``ds[i]`` return ``None`` under ``"skip"``; collate functions drop ``None`` items.

No HDF5 handle is held between calls: each ``__getitem__`` opens and closes the file, so
the dataset is safe with forked ``DataLoader`` workers.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from slidessl.data.formats import SlideError, SlideRecord, open_slide
from slidessl.data.grid import ORDERS, cap_tiles, spatial_order
from slidessl.data.manifest import Manifest, ManifestEntry, load_manifest

ON_BAD_SLIDE = ("error", "skip")


def slide_hash(slide_id: str) -> int:
    """A stable 63-bit integer of a slide id (the same in every process and run, unlike
    ``hash``): seeds what must depend on the slide, not on its position."""
    return int.from_bytes(hashlib.sha256(str(slide_id).encode()).digest()[:8], "little") >> 1


class SlideSource:
    """What the slide readers share (:class:`SlideDataset`, and the published Prov-GigaPath
    pipeline's reader in ``eval``): ``entries`` (the usable manifest rows), ``load(i)``
    (raises :class:`SlideError`) and ``bad_slide(slide_id, exc)`` (the ``on_bad_slide``
    policy); indexing applies the policy, ``None`` standing for a slide skipped on read."""

    entries: list[ManifestEntry]

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict | None:
        try:
            return self.load(index)
        except SlideError as exc:
            self.bad_slide(self.entries[index].slide_id, exc)
            return None


class SlideDataset(SlideSource, Dataset):
    """Slides of a manifest as ``{"slide_id", "index", "features", "grid", "num_tiles"}``.

    ``features`` is a float32 tensor ``(n, D)``, ``grid`` int64 ``(n, 2)`` integer grid
    positions ``(gx, gy)``, both in ``order`` (``"hilbert"``, ``"zorder"``, ``"rowmajor"``);
    ``n = min(num_tiles, max_tiles)``. Slides with more tiles are capped by a spatially
    uniform random subsample (:func:`~slidessl.data.grid.cap_tiles`) that is a function of
    ``(seed, index, epoch)``: call :meth:`set_epoch` to draw a new subsample each epoch.
    With ``cap_key="slide_id"`` it is a function of ``(seed, slide_id, epoch)`` instead: the
    same slide gets the same subsample in any manifest, at any position (what embedding
    needs: a resumed or re-ordered run gives the same vectors).
    ``stride`` is the fallback tile stride for files without a ``patch_size_level0``
    attribute and without a manifest ``stride``; otherwise the stride is inferred.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path,
        max_tiles: int | None = 8192,
        order: str = "hilbert",
        on_bad_slide: str = "error",
        seed: int = 0,
        *,
        stride: float | None = None,
        nan_policy: str = "error",
        cap_key: str = "index",
    ):
        if cap_key not in ("index", "slide_id"):
            raise ValueError(f"cap_key must be 'index' or 'slide_id', got {cap_key!r}")
        self.cap_key = cap_key
        if on_bad_slide not in ON_BAD_SLIDE:
            raise ValueError(f"on_bad_slide must be one of {ON_BAD_SLIDE}, got {on_bad_slide!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.max_tiles = max_tiles
        self.order = order
        self.on_bad_slide = on_bad_slide
        self.seed = int(seed)
        self.stride = stride
        self.nan_policy = nan_policy
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self.entries: list[ManifestEntry] = []
        self.num_tiles: list[int] = []
        self._validate()

    def _open(self, entry: ManifestEntry, expected_dim: int | None = None) -> SlideRecord:
        stride, source = (entry.stride, "manifest") if entry.stride else (self.stride, "option")
        return open_slide(
            entry.path,
            slide_id=entry.slide_id,
            stride=stride,
            stride_source=source,
            nan_policy=self.nan_policy,
            expected_dim=expected_dim,
        )

    def bad_slide(self, slide_id: str, exc: SlideError) -> None:
        """``on_bad_slide`` applied to a slide that cannot be used: raise ``exc``, or warn,
        list it in ``skipped`` and go on."""
        if self.on_bad_slide == "error":
            raise exc
        self.skipped.append((slide_id, exc.problem))
        warnings.warn(f"skipping slide {slide_id!r}: {exc}", stacklevel=3)

    def _validate(self) -> None:
        opened = []
        for entry in self.manifest.entries:
            try:
                rec = self._open(entry)
            except SlideError as exc:
                self.bad_slide(entry.slide_id, exc)
                continue
            opened.append((entry, rec.feature_dim, rec.num_tiles, rec.path))
        dims = Counter(d for _, d, _, _ in opened)
        self.feature_dim = dims.most_common(1)[0][0] if dims else None
        for entry, dim, n, path in opened:
            if dim != self.feature_dim:
                problem = f"feature dim {dim} differs from the dataset's {self.feature_dim}"
                self.bad_slide(entry.slide_id, SlideError(path, problem))
                continue
            self.entries.append(entry)
            self.num_tiles.append(n)
        if not self.entries:
            raise ValueError(
                f"no usable slides in {self.manifest.source or 'the manifest'}: "
                f"all {len(self.skipped)} were skipped"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the tile subsample of ``epoch`` for capped slides."""
        self.epoch = int(epoch)

    def resampled(
        self, max_tiles: int | None, *, seed: int, cap_key: str = "index", on_bad_slide="skip"
    ) -> SlideDataset:
        """The same validated slides read with another cap, seed and bad-slide policy (no
        file is opened again); ``skipped`` starts empty."""
        other = copy.copy(self)
        other.max_tiles, other.seed, other.cap_key = max_tiles, int(seed), cap_key
        other.on_bad_slide, other.epoch, other.skipped = on_bad_slide, 0, []
        return other

    def load(self, index: int) -> dict:
        """Slide ``index`` as ``__getitem__`` gives it, raising the
        :class:`~slidessl.data.formats.SlideError` of a slide whose features cannot be read
        (whatever ``on_bad_slide`` says)."""
        if not 0 <= index < len(self.entries):
            raise IndexError(f"slide index {index} out of range [0, {len(self.entries)})")
        entry = self.entries[index]
        rec = self._open(entry, expected_dim=self.feature_dim)
        if self.max_tiles is None:
            rows = np.arange(rec.num_tiles)
        else:
            key = index if self.cap_key == "index" else slide_hash(entry.slide_id)
            rng = np.random.default_rng([self.seed, key, self.epoch])
            rows = cap_tiles(rec.grid, self.max_tiles, rng)
        feats = rec.read_features(rows)
        grid = rec.grid[rows]
        perm = spatial_order(grid, self.order)
        return {
            "slide_id": entry.slide_id,
            "index": index,
            "features": torch.from_numpy(np.ascontiguousarray(feats[perm])),
            "grid": torch.from_numpy(np.ascontiguousarray(grid[perm])),
            "num_tiles": rec.num_tiles,
        }
