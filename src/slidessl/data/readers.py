"""Low-level readers: one per container (HDF5, ``.npz``, ``.pt``).

A reader *probes* a file (shapes, dtype, coords, attributes; the features are not read)
and later *reads rows* of the features. :mod:`slidessl.data.formats` builds the validated
:class:`~slidessl.data.formats.SlideRecord` on top. No reader keeps a file handle open
between calls, so records are safe to share across forked data-loader workers.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slidessl.data.errors import SlideError

H5_EXTENSIONS = (".h5", ".hdf5")
PT_EXTENSIONS = (".pt", ".pth")
SLIDE_EXTENSIONS = H5_EXTENSIONS + (".npz",) + PT_EXTENSIONS

# Reading more than this fraction of the rows reads the whole dataset and slices in memory.
_WHOLE_READ_FRACTION = 0.5


@dataclass
class RawSlide:
    """What a probe learns without reading the features."""

    container: str  # "h5" | "npz" | "pt"
    features_shape: tuple
    dtype: str
    coords: np.ndarray | None
    attrs: dict = field(default_factory=dict)
    bare_tensor: bool = False


def _plain(value):
    """HDF5 attribute value -> plain Python (numbers, strings, lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _check_float(path: Path, dtype: np.dtype | str) -> str:
    name = str(dtype)
    if name not in ("float16", "float32", "float64", "bfloat16"):
        raise SlideError(path, f"features have dtype {name}; expected float16, bfloat16 or float32")
    return name


# --------------------------------------------------------------------------- HDF5


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SlideError(path, f"unreadable or truncated HDF5 file ({exc})") from exc


def _dataset(path: Path, f, key: str):
    import h5py

    if key not in f:
        raise SlideError(path, f"missing dataset {key!r} (found: {sorted(f.keys())})")
    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise SlideError(path, f"{key!r} is a group, not a dataset")
    return node


def read_h5_coords(path: Path) -> tuple[np.ndarray, dict]:
    """``coords`` and the merged file/coords attributes of an HDF5 file (CLAM patch files too)."""
    with _open_h5(path) as f:
        ds = _dataset(path, f, "coords")
        try:
            coords = ds[()]
        except (OSError, RuntimeError) as exc:
            raise SlideError(path, f"truncated or corrupt 'coords' dataset ({exc})") from exc
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        attrs.update({k: _plain(v) for k, v in ds.attrs.items()})
    return np.asarray(coords), attrs


def probe_h5(path: Path) -> RawSlide:
    with _open_h5(path) as f:
        feats = _dataset(path, f, "features")
        shape, dtype = tuple(feats.shape), _check_float(path, feats.dtype)
        feat_attrs = {k: _plain(v) for k, v in feats.attrs.items()}
    coords, attrs = read_h5_coords(path)
    return RawSlide("h5", shape, dtype, coords, {**feat_attrs, **attrs})


def read_h5_rows(path: Path, rows: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Rows (sorted, unique) of ``features``; only those rows are read for small subsets."""
    with _open_h5(path) as f:
        ds = _dataset(path, f, "features")
        try:
            if rows is None:
                return ds[()]
            if len(rows) >= _WHOLE_READ_FRACTION * n_rows:
                return ds[()][rows]
            if len(rows) == 0:
                return np.empty((0,) + ds.shape[1:], dtype=ds.dtype)
            return ds[rows]
        except (OSError, RuntimeError) as exc:
            raise SlideError(path, f"truncated or corrupt 'features' dataset ({exc})") from exc


# --------------------------------------------------------------------------- npz


def _npz_header(path: Path, key: str) -> tuple[tuple, np.dtype]:
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.removesuffix(".npy") for n in z.namelist()]
            if key not in names:
                raise SlideError(path, f"missing array {key!r} (found: {sorted(names)})")
            with z.open(f"{key}.npy") as fh:
                version = fmt.read_magic(fh)
                reader = (
                    fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                )
                shape, _, dtype = reader(fh)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, SlideError):
            raise
        raise SlideError(path, f"unreadable or truncated .npz file ({exc})") from exc
    return tuple(shape), dtype


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SlideError(path, f"unreadable or truncated .npz file ({exc})") from exc


def probe_npz(path: Path) -> RawSlide:
    shape, dtype = _npz_header(path, "features")
    dtype_name = _check_float(path, dtype)
    _npz_header(path, "coords")
    return RawSlide("npz", shape, dtype_name, _npz_array(path, "coords"))


def read_npz_rows(path: Path, rows: np.ndarray | None) -> np.ndarray:
    feats = _npz_array(path, "features")
    return feats if rows is None else feats[rows]


# --------------------------------------------------------------------------- .pt


def _load_pt(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for bad files
        raise SlideError(
            path,
            "unreadable .pt file (only tensors or dicts of tensors are loaded, with "
            f"weights_only=True): {type(exc).__name__}: {exc}",
        ) from exc


def _tensor_to_numpy(path: Path, obj, key: str) -> tuple[np.ndarray, str]:
    import torch

    if not isinstance(obj, torch.Tensor):
        raise SlideError(path, f"{key!r} is a {type(obj).__name__}, expected a tensor")
    name = str(obj.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return obj.float().numpy(), name
    return obj.numpy(), name


def _pt_payload(path: Path) -> tuple[np.ndarray, np.ndarray | None, str, bool]:
    import torch

    obj = _load_pt(path)
    if isinstance(obj, torch.Tensor):
        feats, dtype = _tensor_to_numpy(path, obj, "features")
        return feats, None, dtype, True
    if not isinstance(obj, dict):
        raise SlideError(path, f".pt file holds a {type(obj).__name__}; expected a tensor or dict")
    if "features" not in obj:
        raise SlideError(path, f"missing key 'features' (found: {sorted(map(str, obj))})")
    feats, dtype = _tensor_to_numpy(path, obj["features"], "features")
    if "coords" not in obj:
        return feats, None, dtype, True
    coords, _ = _tensor_to_numpy(path, obj["coords"], "coords")
    return feats, coords, dtype, False


def probe_pt(path: Path) -> RawSlide:
    feats, coords, dtype, bare = _pt_payload(path)
    _check_float(path, dtype)
    return RawSlide("pt", tuple(feats.shape), dtype, coords, bare_tensor=bare)


def read_pt_rows(path: Path, rows: np.ndarray | None) -> np.ndarray:
    feats = _pt_payload(path)[0]
    return feats if rows is None else feats[rows]


def sibling_h5(path: Path) -> Path | None:
    """The coords file of a CLAM ``pt_files/X.pt``: ``X.h5`` beside it or in ``../h5_files/``."""
    for cand in (
        path.with_suffix(".h5"),
        path.parent.parent / "h5_files" / f"{path.stem}.h5",
    ):
        if cand.is_file():
            return cand
    return None


def probe(path: Path) -> RawSlide:
    ext = path.suffix.lower()
    if ext in H5_EXTENSIONS:
        return probe_h5(path)
    if ext == ".npz":
        return probe_npz(path)
    if ext in PT_EXTENSIONS:
        return probe_pt(path)
    raise SlideError(
        path,
        f"unknown extension {ext or '(none)'!r}; expected one of {', '.join(SLIDE_EXTENSIONS)}",
    )


def read_rows(path: Path, container: str, rows: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Feature rows in the on-disk dtype (bf16 arrives as float32). ``rows`` sorted, unique."""
    if container == "h5":
        return read_h5_rows(path, rows, n_rows)
    if container == "npz":
        return read_npz_rows(path, rows)
    return read_pt_rows(path, rows)
