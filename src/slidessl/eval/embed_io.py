"""Slide-embedding files: one vector per slide, keyed by slide id.

HDF5 (default): dataset ``/embeddings/<slide id>`` (float32, (E,)) per slide; root attributes
``encoder``, ``pooling``, ``dim``. ``/`` in a slide id is stored as ``%2F``. Parquet (when
the path ends in ``.parquet`` and pyarrow is installed): columns ``slide_id`` and
``embedding`` (list of float32).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from slidessl.atomic import atomic_write


def slide_key(slide_id: str) -> str:
    """A slide id as a key of a file's flat namespace (HDF5 names, npz entries): ``/`` and
    ``%`` escaped."""
    return slide_id.replace("%", "%25").replace("/", "%2F")


def slide_from_key(key: str) -> str:
    """The slide id behind :func:`slide_key`."""
    return key.replace("%2F", "/").replace("%25", "%")


def is_parquet(path: str | Path) -> bool:
    return str(path).endswith(".parquet")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ModuleNotFoundError as exc:
        raise ValueError("parquet output needs pyarrow: pip install 'slidessl[parquet]'") from exc
    return pyarrow


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """``(slide_ids, (n, E) float32, attrs)`` from an embeddings file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: embeddings file does not exist")
    if is_parquet(path):
        pa = _pyarrow()
        table = pa.parquet.read_table(path)
        ids = [str(s) for s in table.column("slide_id").to_pylist()]
        rows = table.column("embedding").to_pylist()
        mat = np.asarray(rows, dtype=np.float32).reshape(len(ids), -1)
        attrs = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return ids, mat, attrs
    try:
        with h5py.File(path, "r") as f:
            if "embeddings" not in f:
                raise ValueError(f"{path}: no 'embeddings' group (not a slidessl embeddings file)")
            grp = f["embeddings"]
            keys = sorted(grp.keys())
            ids = [slide_from_key(k) for k in keys]
            vecs = [np.asarray(grp[k][()], dtype=np.float32) for k in keys]
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read embeddings ({exc})") from exc
    if not vecs:
        raise ValueError(f"{path}: holds no embeddings")
    dims = {v.shape for v in vecs}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"{path}: embeddings have inconsistent shapes {sorted(dims)}")
    mat = np.stack(vecs)
    if not np.all(np.isfinite(mat)):
        bad = [ids[i] for i in np.where(~np.isfinite(mat).all(axis=1))[0][:3]]
        raise ValueError(f"{path}: non-finite embeddings for slides {bad}")
    return ids, mat, attrs


def existing_ids(path: str | Path) -> set[str]:
    """Slide ids already in ``path`` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    return set(read_embeddings(path)[0])


def _plain_attrs(attrs: dict) -> dict:
    """File attributes as numbers or strings (what HDF5 and parquet metadata both hold)."""
    return {k: str(v) if not isinstance(v, int | float) else v for k, v in attrs.items()}


class EmbeddingWriter:
    """Append slide vectors to an embeddings file as they are computed (HDF5: flushed per
    batch so an interrupted run resumes; parquet: rewritten atomically on ``close``)."""

    def __init__(self, path: str | Path, attrs: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.attrs = _plain_attrs(attrs)
        self._rows: dict[str, np.ndarray] = {}
        self._written: list[str] = []
        if is_parquet(self.path):
            _pyarrow()
            if self.path.exists():
                ids, mat, _ = read_embeddings(self.path)
                self._rows = dict(zip(ids, mat))
            self._h5 = None
        else:
            self._h5 = h5py.File(self.path, "a")
            self._h5.require_group("embeddings")
            for k, v in self.attrs.items():
                self._h5.attrs[k] = v

    @property
    def written(self) -> list[str]:
        """Slide ids written through this writer (not those already in the file)."""
        return list(self._written)

    def set_attrs(self, attrs: dict) -> None:
        """Add or replace file attributes (e.g. counts known only at the end)."""
        fixed = _plain_attrs(attrs)
        self.attrs.update(fixed)
        if self._h5 is not None:
            for k, v in fixed.items():
                self._h5.attrs[k] = v

    def write(self, slide_ids: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self._written.extend(slide_ids)
        if self._h5 is None:
            self._rows.update(zip(slide_ids, vectors))
            return
        grp = self._h5["embeddings"]
        for sid, vec in zip(slide_ids, vectors):
            key = slide_key(sid)
            if key in grp:
                del grp[key]
            grp.create_dataset(key, data=vec)
        self._h5.flush()

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            return
        pa = _pyarrow()
        ids = list(self._rows)
        table = pa.table(
            {"slide_id": ids, "embedding": [self._rows[i].tolist() for i in ids]},
            metadata={k: str(v) for k, v in self.attrs.items()},
        )
        # a resumed file holds earlier slides: never leave it half written
        atomic_write(self.path, lambda handle: pa.parquet.write_table(table, handle))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
