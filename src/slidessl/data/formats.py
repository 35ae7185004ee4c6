"""Open one slide file (TRIDENT / CLAM / Prov-GigaPath HDF5, ``.npz``, ``.pt``) as a record.

:func:`open_slide` reads the coordinates (small) and the feature header, validates both,
resolves the tile stride and converts coordinates to integer grid positions. Features are
read lazily by :meth:`SlideRecord.read_features`, which touches only the requested rows.

Stride resolution (coordinate units per grid step), first match wins:

1. ``attribute``: TRIDENT's ``patch_size_level0`` on ``coords``; with ``overlap > 0`` the
   step is ``patch_size_level0 - overlap * patch_size_level0 / patch_size``;
2. ``manifest`` / ``option``: the ``stride`` argument (``stride_source`` says which);
3. ``inferred``: the most common positive gap between sorted unique x and y values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slidessl.data import readers
from slidessl.data.errors import SlideError
from slidessl.data.grid import GridError, infer_stride, to_grid

__all__ = ["SlideError", "SlideRecord", "open_slide", "resolve_stride", "SLIDE_EXTENSIONS"]

SLIDE_EXTENSIONS = readers.SLIDE_EXTENSIONS
NAN_POLICIES = ("error", "drop")
_SCAN_CHUNK = 4096
log = logging.getLogger(__name__)


@dataclass
class SlideRecord:
    """A validated slide: coords and grid in memory, features read on demand."""

    slide_id: str
    path: Path
    source_format: str
    num_tiles: int
    feature_dim: int
    dtype: str
    coords: np.ndarray
    stride: float
    stride_source: str
    attrs: dict
    grid: np.ndarray
    container: str = field(default="h5", repr=False)
    file_rows: np.ndarray | None = field(default=None, repr=False)  # kept rows, None = all
    num_file_rows: int = field(default=0, repr=False)

    def _map_rows(self, rows) -> np.ndarray:
        idx = np.asarray(rows)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise SlideError(
                self.path, f"rows must be a 1-D integer array, got {idx.dtype} {idx.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tiles):
            raise SlideError(
                self.path, f"row index out of range [0, {self.num_tiles}): {idx.min()}..{idx.max()}"
            )
        idx = idx.astype(np.int64)
        return idx if self.file_rows is None else self.file_rows[idx]

    def read_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Features as float32 ``(len(rows), D)`` (all tiles when ``rows`` is None).

        Rows may come in any order and repeat; the file is read once, in sorted order.
        Raises :class:`SlideError` when a row read holds NaN or Inf.
        """
        if rows is None and self.file_rows is None:
            data = readers.read_rows(self.path, self.container, None, self.num_file_rows)
        else:
            wanted = self._map_rows(np.arange(self.num_tiles) if rows is None else rows)
            if len(wanted) < 2 or bool(np.all(wanted[1:] > wanted[:-1])):
                data = readers.read_rows(self.path, self.container, wanted, self.num_file_rows)
            else:  # unsorted or repeated rows: read each once, in order, then rearrange
                unique, inverse = np.unique(wanted, return_inverse=True)
                block = readers.read_rows(self.path, self.container, unique, self.num_file_rows)
                data = block[inverse]
        out = _as_float32(data)
        if out.shape[1:] != (self.feature_dim,):
            raise SlideError(self.path, f"features changed shape on read: {out.shape}")
        finite = _finite_rows(out)
        if not finite.all():
            raise SlideError(
                self.path,
                f"{int((~finite).sum())} of the {len(out)} rows read hold NaN/Inf features "
                "(open with nan_policy='drop' to drop such rows)",
            )
        return out

    def scan_nonfinite(self) -> np.ndarray:
        """Record rows whose features hold NaN or Inf (reads the whole file in chunks)."""
        return _scan_nonfinite(self.path, self.container, self.num_file_rows, self.file_rows)


def _as_float32(data: np.ndarray) -> np.ndarray:
    """float32 copy; fp16 goes through torch, whose vectorised half conversion is several
    times faster than numpy's."""
    if data.dtype == np.float16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(data)).float().numpy()
    return np.asarray(data, dtype=np.float32)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Per-row "all finite"; a row sum is NaN/Inf whenever a value is (fast path first)."""
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(x.sum(axis=1))
    if not finite.all():  # a sum may also overflow: check the flagged rows exactly
        flagged = np.flatnonzero(~finite)
        finite[flagged] = np.isfinite(x[flagged]).all(axis=1)
    return finite


def _scan_nonfinite(path, container, n_rows, keep=None) -> np.ndarray:
    """Indices (into ``keep`` when given, else file rows) of rows with NaN/Inf features."""
    if container == "h5":
        bad = []
        for start in range(0, n_rows, _SCAN_CHUNK):
            rows = np.arange(start, min(start + _SCAN_CHUNK, n_rows))
            block = readers.read_rows(path, "h5", rows, n_rows)
            bad.append(rows[~_finite_rows(block)])
        bad_rows = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    else:
        block = readers.read_rows(path, container, None, n_rows)
        bad_rows = np.flatnonzero(~_finite_rows(block))
    if keep is None:
        return bad_rows.astype(np.int64)
    return np.flatnonzero(np.isin(keep, bad_rows)).astype(np.int64)


def resolve_stride(path, coords, attrs, stride=None, stride_source="option") -> tuple[float, str]:
    """The tile stride in coordinate units and where it came from (see module docstring)."""
    psl0 = attrs.get("patch_size_level0")
    if psl0 is not None and float(psl0) > 0:
        step = float(psl0)
        overlap = float(attrs.get("overlap", 0) or 0)
        if overlap > 0:
            patch_size = float(attrs.get("patch_size") or psl0)
            step = step - overlap * step / patch_size
            if step <= 0:
                raise SlideError(
                    path, f"overlap {overlap:g} >= patch_size {patch_size:g}: no positive stride"
                )
        return step, "attribute"
    if stride is not None:
        if stride_source not in ("manifest", "option"):
            raise ValueError(f"stride_source must be 'manifest' or 'option', got {stride_source!r}")
        if not np.isfinite(stride) or float(stride) <= 0:
            raise SlideError(path, f"{stride_source} stride must be positive, got {stride}")
        return float(stride), stride_source
    inferred = infer_stride(coords)
    step = 1.0 if inferred is None else inferred
    _check_inferred(path, coords, step)
    return step, "inferred"


# below this share of its bounding box's grid cells, an inferred grid explains nothing: real
# tissue (fragments, needle cores) fills ~0.05-0.9 of it
MIN_INFERRED_FILL = 0.01


def _check_inferred(path, coords, step: float) -> None:
    """An inferred stride must explain the coordinates: coordinates off any tile grid (e.g.
    pixel positions jittered between tiles) infer a stride of a pixel or two and a grid
    that the tiles fill almost nowhere. That is an error naming the fixes, not a note."""
    c = np.asarray(coords, dtype=np.float64)
    if len(c) < 32:
        return
    cells = np.prod((c.max(axis=0) - c.min(axis=0)) / step + 1)
    fill = len(c) / cells
    if fill < MIN_INFERRED_FILL:
        raise SlideError(
            path,
            f"the tile stride inferred from the coordinate gaps ({step:g}) cannot explain the "
            f"coordinates: their {len(c)} tiles fill {fill:.4f} of that grid's "
            f"{int(cells):,} cells (the coordinates look off any tile grid). Give the stride: "
            "a `stride` column in the manifest, the file's `patch_size_level0` attribute, or "
            "`slidessl inspect --stride S` to check one",
        )


def _source_format(raw: readers.RawSlide, coords_dtype: np.dtype) -> str:
    if raw.container != "h5":
        return raw.container
    if "patch_size_level0" in raw.attrs:
        return "trident"
    if coords_dtype == np.int32:
        return "clam"
    if raw.features_shape[-1] == 1536:
        return "gigapath"
    return "h5"


def _integer_coords(path: Path, coords: np.ndarray) -> np.ndarray:
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise SlideError(path, f"coords must have shape (N, 2), got {c.shape}")
    if np.issubdtype(c.dtype, np.integer):
        return c.astype(np.int64)
    if not np.issubdtype(c.dtype, np.floating):
        raise SlideError(path, f"coords have non-numeric dtype {c.dtype}")
    if not np.isfinite(c).all():
        raise SlideError(path, "coords hold NaN/Inf")
    r = np.rint(c)
    if np.abs(c - r).max(initial=0) > 1e-6:
        raise SlideError(path, "coords are not whole numbers of pixels")
    return r.astype(np.int64)


def _check_duplicates(path: Path, coords: np.ndarray) -> None:
    key = coords[:, 0] * (int(coords[:, 1].max()) + 1) + coords[:, 1]  # coords >= 0 here
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if len(uniq) < len(coords):
        x, y = coords[first[np.argmax(counts)]]
        raise SlideError(
            path,
            f"duplicate coordinates: {len(coords) - len(uniq)} tiles repeat a position "
            f"(e.g. ({x}, {y}) appears {counts.max()} times)",
        )


def open_slide(
    path,
    *,
    slide_id: str | None = None,
    stride: float | None = None,
    stride_source: str = "option",
    coords_from=None,
    nan_policy: str = "error",
    expected_dim: int | None = None,
) -> SlideRecord:
    """Open and validate one slide file; see the module docstring for the stride rules.

    ``coords_from`` names an HDF5 file with ``coords`` for a bare ``.pt`` tensor (CLAM
    ``pt_files``); by default ``X.h5`` beside it or ``../h5_files/X.h5`` is used.
    ``nan_policy="drop"`` scans all features once and drops rows holding NaN/Inf (the
    count goes to ``attrs["dropped_nonfinite"]``); ``"error"`` raises when such a row is read.
    """
    path = Path(path)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not path.is_file():
        raise SlideError(path, "file not found")
    raw = readers.probe(path)
    attrs = dict(raw.attrs)
    coords = raw.coords
    if raw.bare_tensor or coords is None:
        src = Path(coords_from) if coords_from is not None else readers.sibling_h5(path)
        if src is None:
            raise SlideError(
                path,
                "holds features without coordinates (a bare tensor, as in CLAM pt_files); "
                "positional models need coords: put the matching h5 (X.h5 beside it or in "
                "../h5_files/) or pass coords_from",
            )
        coords, coord_attrs = readers.read_h5_coords(src)
        attrs.update(coord_attrs)
        attrs["coords_from"] = str(src)
    if len(raw.features_shape) != 2:
        raise SlideError(path, f"features must have shape (N, D), got {raw.features_shape}")
    n_rows, dim = raw.features_shape
    coords_dtype = np.asarray(coords).dtype
    coords = _integer_coords(path, coords)
    if n_rows == 0:
        raise SlideError(path, "zero tiles")
    if len(coords) != n_rows:
        raise SlideError(path, f"features have {n_rows} rows but coords have {len(coords)}")
    if expected_dim is not None and dim != expected_dim:
        raise SlideError(path, f"feature dim {dim} differs from the dataset's {expected_dim}")
    if coords.min() < 0:
        raise SlideError(path, f"negative coordinates ({int((coords < 0).any(1).sum())} tiles)")
    _check_duplicates(path, coords)
    file_rows = None
    if nan_policy == "drop":
        bad = _scan_nonfinite(path, raw.container, n_rows)
        if bad.size:
            file_rows = np.setdiff1d(np.arange(n_rows), bad)
            if file_rows.size == 0:
                raise SlideError(path, f"zero tiles (all {n_rows} rows hold NaN/Inf)")
            coords = coords[file_rows]
            attrs["dropped_nonfinite"] = int(bad.size)
            log.warning("%s: dropped %d of %d tiles with NaN/Inf features", path, bad.size, n_rows)
    step, source = resolve_stride(path, coords, attrs, stride, stride_source)
    try:
        grid = to_grid(coords, step, assume_unique=True)
    except GridError as exc:
        raise SlideError(path, f"{exc} (stride from {source})") from exc
    return SlideRecord(
        slide_id=slide_id if slide_id is not None else path.stem,
        path=path,
        source_format=_source_format(raw, coords_dtype),
        num_tiles=len(coords),
        feature_dim=int(dim),
        dtype=raw.dtype,
        coords=coords,
        stride=step,
        stride_source=source,
        attrs=attrs,
        grid=grid,
        container=raw.container,
        file_rows=file_rows,
        num_file_rows=int(n_rows),
    )
