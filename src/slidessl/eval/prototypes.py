"""Label-free prototype baselines: what a slide encoder must beat.

``prototypes[:K]`` — tile-feature prototypes fitted without labels on the tiles of the
cohort being embedded (PCA-whitened features, then k-means or a diagonal Gaussian mixture;
seeded), and per slide the prototype proportions plus the mean whitened feature of each
prototype's tiles: the slide summaries of H2T (Vu et al., 2023, "Handcrafted Histological
Transformer", Medical Image Analysis) and PANTHER (Song et al., 2024, "Morphological
Prototyping for Unsupervised Slide Representation Learning", CVPR).

``cooc[:K]`` — the above plus the prototypes' co-occurrence on the tile grid: for each
radius ``r`` (default 1 and 3), the normalised count of tile pairs at Chebyshev grid
distance ``1 .. r`` whose prototypes are ``(a, b)`` (symmetric, upper triangle kept).
Mean pooling and ABMIL see which tiles a slide has; this also sees which tiles touch.

Assignments are hard for k-means and soft (responsibilities) for the mixture; every
statistic is computed from the ``(n, K)`` assignment matrix ``R`` the same way, so
``cooc`` of pairs ``(i, j)`` is ``R[i]^T R[j]`` summed.

Example::

    model = fit_prototypes([it["features"] for it in items], k=16, seed=0)
    X = np.stack([slide_vector(model, it["features"], it["grid"], "cooc") for it in items])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from slidessl.eval.embedder import Embedder
from slidessl.eval.slides import read_slides

__all__ = [
    "DEFAULT_K",
    "DEFAULT_RADII",
    "PrototypeEmbedder",
    "PrototypeModel",
    "cooccurrence",
    "fit_prototypes",
    "parse_prototype_spec",
    "slide_vector",
]

DEFAULT_K = 16
DEFAULT_RADII = (1, 3)
KINDS = ("prototypes", "cooc")
METHODS = ("kmeans", "gmm")
PCA_DIM = 32
FIT_TILES = 100_000


def parse_prototype_spec(spec: str) -> tuple[str, int, str]:
    """``prototypes`` / ``cooc`` ``[:K[:kmeans|gmm]]`` -> ``(kind, K, method)``."""
    kind, *rest = spec.split(":")
    if kind not in KINDS or len(rest) > 2:
        raise ValueError(f"{spec!r}: expected prototypes[:K[:kmeans|gmm]] or cooc[:K[:...]]")
    k = DEFAULT_K
    if rest and rest[0]:
        try:
            k = int(rest[0])
        except ValueError as exc:
            raise ValueError(f"{spec!r}: K must be an integer, got {rest[0]!r}") from exc
    method = rest[1] if len(rest) > 1 else "kmeans"
    if k < 2:
        raise ValueError(f"{spec!r}: K must be >= 2, got {k}")
    if method not in METHODS:
        raise ValueError(f"{spec!r}: method must be one of {METHODS}, got {method!r}")
    return kind, k, method


@dataclass
class PrototypeModel:
    """PCA whitening ``z = (x - mean) @ proj`` and a clustering of ``z``."""

    k: int
    method: str
    seed: int
    mean: np.ndarray
    proj: np.ndarray  # (D, d): principal axes divided by their std
    estimator: object
    n_fit_tiles: int
    radii: tuple[int, ...] = field(default=DEFAULT_RADII)

    def whiten(self, x) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.proj

    def assign(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Whitened features ``(n, d)`` and assignments ``R`` ``(n, K)`` (rows sum to 1)."""
        z = self.whiten(x)
        if self.method == "gmm":
            return z, self.estimator.predict_proba(z)
        r = np.zeros((len(z), self.k))
        r[np.arange(len(z)), self.estimator.predict(z)] = 1.0
        return z, r

    def digest(self) -> str:
        """Identifies the fitted model (a resumed embedding file must match it)."""
        h = hashlib.blake2b(digest_size=12)
        centres = self.estimator.means_ if self.method == "gmm" else self.estimator.cluster_centers_
        for a in (self.mean, self.proj, centres):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()


def fit_prototypes(
    features: list,
    k: int = DEFAULT_K,
    method: str = "kmeans",
    seed: int = 0,
    max_tiles: int = FIT_TILES,
    radii=DEFAULT_RADII,
) -> PrototypeModel:
    """Fit whitening and prototypes on (a seeded subsample of) the tiles of ``features``,
    a list of ``(n_i, D)`` arrays or tensors. No label is read."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    if method not in METHODS:
        raise ValueError(f"prototype method must be one of {METHODS}, got {method!r}")
    arrays = [np.asarray(f, dtype=np.float32) for f in features if len(f)]
    if not arrays:
        raise ValueError("no tiles to fit prototypes on")
    rng = np.random.default_rng(seed)
    total = sum(len(a) for a in arrays)
    share = min(1.0, max_tiles / total)
    sample = np.concatenate(
        [a[rng.random(len(a)) < share] if share < 1 else a for a in arrays], axis=0
    ).astype(np.float64)
    if len(sample) < k:
        raise ValueError(f"{len(sample)} tiles cannot be clustered into K={k} prototypes")
    d = min(PCA_DIM, sample.shape[1], len(sample) - 1)
    pca = PCA(n_components=d, random_state=seed).fit(sample)
    std = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    proj = pca.components_.T / std
    z = (sample - pca.mean_) @ proj
    if method == "gmm":
        est = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4)
    else:
        est = KMeans(k, n_init=4, random_state=seed)
    est.fit(z)
    return PrototypeModel(
        k=k,
        method=method,
        seed=seed,
        mean=pca.mean_,
        proj=proj,
        estimator=est,
        n_fit_tiles=len(sample),
        radii=tuple(int(r) for r in radii),
    )


def _neighbour_pairs(grid: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs ``(i, j)`` of tiles at Chebyshev grid distance ``1 .. radius``."""
    g = np.asarray(grid, dtype=np.int64)
    if len(g) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g = g - g.min(axis=0) + radius
    side = int(g.max()) + radius + 1
    key = g[:, 0] * side + g[:, 1]
    order = np.argsort(key, kind="stable")
    skey = key[order]
    src, dst = [], []
    for dx in range(-radius, radius + 1):
        for dy in range(-radius, radius + 1):
            if dx == 0 and dy == 0:
                continue
            query = key + dx * side + dy
            pos = np.minimum(np.searchsorted(skey, query), len(skey) - 1)
            hit = skey[pos] == query
            src.append(np.flatnonzero(hit))
            dst.append(order[pos[hit]])
    return np.concatenate(src), np.concatenate(dst)


def cooccurrence(grid, assign: np.ndarray, radius: int) -> np.ndarray:
    """``(K, K)`` sum over ordered tile pairs at grid distance ``1 .. radius`` of
    ``assign[i]^T assign[j]`` (counts of prototype pairs for hard assignments)."""
    i, j = _neighbour_pairs(grid, radius)
    a = np.asarray(assign, dtype=np.float64)
    return a[i].T @ a[j]


def slide_vector(model: PrototypeModel, features, grid, kind: str = "cooc") -> np.ndarray:
    """One slide's ``prototypes`` or ``cooc`` vector (float32)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    z, r = model.assign(np.asarray(features, dtype=np.float32))
    mass = r.sum(axis=0)
    parts = [mass / max(len(z), 1)]
    parts.append(((r.T @ z) / max(len(z), 1)).ravel())  # proportion x prototype mean
    if kind == "cooc":
        upper = np.triu_indices(model.k)
        for radius in model.radii:
            c = cooccurrence(grid, r, radius)
            c = c + c.T - np.diag(np.diag(c))  # unordered pairs: (a, b) and (b, a) together
            parts.append(c[upper] / max(c[upper].sum(), 1e-9))
    return np.concatenate(parts).astype(np.float32)


class PrototypeEmbedder(Embedder):
    """``embedder(items)`` / ``embedder.embed(items) -> (B, dim)`` slide vectors of a fitted
    model (``kind`` = ``prototypes`` or ``cooc``) for slide dicts with ``features`` and
    ``grid``. Made from its spec (:meth:`from_spec`), it is fitted on the cohort being
    embedded by :meth:`prepare`; the fit is part of its ``key`` (a resumed file must come
    from the same prototypes)."""

    def __init__(self, model: PrototypeModel | None, kind: str, spec: str = "", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.model, self.kind, self.spec, self.seed = model, kind, spec, int(seed)

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0) -> PrototypeEmbedder:
        """``prototypes`` / ``cooc`` ``[:K[:kmeans|gmm]]``, not yet fitted."""
        return cls(None, parse_prototype_spec(spec)[0], spec, seed)

    @property
    def key(self) -> str:
        return f"{self.spec}:seed{self.seed}:{self.model.digest()}"

    @property
    def description(self) -> str:
        return self.key

    @property
    def digest(self) -> str:
        return self.model.digest()

    def prepare(self, dataset, workers: int = 0) -> None:
        """Fit on the tiles of every slide of ``dataset`` (see :meth:`fit`)."""
        self.model = self.fit(self.spec, dataset, self.seed, workers=workers).model

    def embed(self, items: list[dict]) -> np.ndarray:
        return np.stack(
            [
                slide_vector(
                    self.model, np.asarray(it["features"]), np.asarray(it["grid"]), self.kind
                )
                for it in items
            ]
        )

    __call__ = embed

    @classmethod
    def fit_items(cls, spec: str, items: list[dict], seed: int = 0, fit_tiles: int = FIT_TILES):
        """Fit ``spec`` on the tiles of preloaded slide dicts (at most ``fit_tiles``, a seeded
        subsample). Reads no label."""
        kind, k, method = parse_prototype_spec(spec)
        feats = [np.asarray(it["features"]) for it in items]
        return cls(fit_prototypes(feats, k, method, seed, max_tiles=fit_tiles), kind, spec, seed)

    @classmethod
    def fit(
        cls, spec: str, dataset, seed: int = 0, fit_tiles: int = FIT_TILES, workers: int = 0
    ) -> PrototypeEmbedder:
        """Fit ``spec`` on the tiles of every slide of ``dataset`` (a ``SlideDataset``),
        at most ``fit_tiles`` in all: each slide contributes a spatially uniform subsample
        of ``fit_tiles / len(dataset)`` tiles (at least 16, seeded by ``seed`` and the
        slide's position; a slide that cannot be read is skipped), read by ``workers``
        processes. Reads no label."""
        kind, k, method = parse_prototype_spec(spec)
        per_slide = max(16, fit_tiles // max(len(dataset), 1))
        sample = dataset.resampled(per_slide, seed=seed, cap_key="index", on_bad_slide="skip")
        batches = [[i] for i in range(len(sample))]
        feats = [it["features"].numpy() for b in read_slides(sample, batches, workers) for it in b]
        model = fit_prototypes(feats, k, method, seed, max_tiles=fit_tiles)
        return cls(model, kind, spec, seed)
