"""Ranking metrics for slide-level tasks: AUROC and AUPRC (average precision).

The headline scores (:func:`task_metrics`) are scikit-learn's ``roc_auc_score`` and
``average_precision_score``. The bootstrap CIs score a thousand resamples at once with
:func:`binary_auroc` / :func:`binary_auprc`, written vectorised over rows because one
scikit-learn call per resample is 9x (1,000 slides) to 90x (180 slides) slower
(``python benchmarks/bench_probe.py`` prints the ratio); they follow scikit-learn's
conventions exactly and are tested against it:

- AUROC: the Mann-Whitney statistic with mid-ranks for tied scores.
- AUPRC: average precision, ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds
  (no interpolation), as in scikit-learn.
- Multi-class: one-vs-rest per class, macro average (unweighted mean over classes).
- Multi-label: per label, then macro (mean over labels) and micro (all labels pooled).

A row with no positive or no negative has an undefined score and gives ``nan``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata


def _as_2d(y, s) -> tuple[np.ndarray, np.ndarray, bool]:
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    one = y.ndim == 1
    if one:
        y, s = y[None], s[None]
    return (y > 0).astype(np.float64), s, one


def binary_auroc(y, s) -> np.ndarray | float:
    """AUROC of scores ``s`` for binary labels ``y`` (1 = positive); rows are independent."""
    y, s, one = _as_2d(y, s)
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    ranks = rankdata(s, axis=1)  # mid-ranks for ties
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
    auc = np.where((pos > 0) & (neg > 0), auc, np.nan)
    return float(auc[0]) if one else auc


def binary_auprc(y, s) -> np.ndarray | float:
    """Average precision of scores ``s`` for binary labels ``y``; rows are independent."""
    y, s, one = _as_2d(y, s)
    n = y.shape[1]
    order = np.argsort(-s, axis=1, kind="stable")
    ys = np.take_along_axis(y, order, axis=1)
    ss = np.take_along_axis(s, order, axis=1)
    tp = np.cumsum(ys, axis=1)
    precision = tp / np.arange(1, n + 1)
    # Each tied group counts once, at its last member (the threshold sklearn uses).
    is_end = np.ones_like(ss, dtype=bool)
    is_end[:, :-1] = ss[:, :-1] != ss[:, 1:]
    idx = np.where(is_end, np.arange(n), n)
    group_end = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    prec_at_end = np.take_along_axis(precision, group_end, axis=1)
    pos = y.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (ys * prec_at_end).sum(axis=1) / pos
    ap = np.where(pos > 0, ap, np.nan)
    return float(ap[0]) if one else ap


def _sk_binary(y, s) -> dict[str, float]:
    """scikit-learn's AUROC / AP of one score vector; ``nan`` without both classes."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s, _ = _as_2d(y, s)  # the same checks as the vectorised metrics
    y, s = y[0].astype(int), s[0]
    pos = int(y.sum())
    auroc = roc_auc_score(y, s) if 0 < pos < len(y) else float("nan")
    auprc = average_precision_score(y, s) if pos > 0 else float("nan")
    return {"auroc": float(auroc), "auprc": float(auprc)}


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """(n,) integer classes -> (n, n_classes) 0/1 matrix."""
    y = np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"class index out of range [0, {n_classes})")
    out = np.zeros((y.shape[0], n_classes), dtype=np.float64)
    out[np.arange(y.shape[0]), y] = 1.0
    return out


def task_metrics(kind: str, y: np.ndarray, scores: np.ndarray) -> dict:
    """Headline metrics of one task.

    ``kind`` is ``"binary"`` (y (n,) 0/1, scores (n,)), ``"multiclass"`` (y (n,) class
    indices, scores (n, C)) or ``"multilabel"`` (y (n, L) 0/1, scores (n, L)). Returns
    ``{"auroc", "auprc"}`` (macro for multi-class / multi-label) plus, for those two,
    ``per_class`` lists and, for multi-label, ``auroc_micro`` / ``auprc_micro``.
    """
    if kind == "binary":
        return _sk_binary(y, scores)
    if kind == "multiclass":
        Y = one_hot(y, scores.shape[1])
    elif kind == "multilabel":
        Y = np.asarray(y)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != scores.shape:
        raise ValueError(f"expected matching (n, L) matrices, got {Y.shape} and {scores.shape}")
    cols = [_sk_binary(Y[:, c], scores[:, c]) for c in range(Y.shape[1])]
    per = {m: np.array([c[m] for c in cols]) for m in ("auroc", "auprc")}
    out = {
        "auroc": _nanmean(per["auroc"]),
        "auprc": _nanmean(per["auprc"]),
        "per_class": {"auroc": per["auroc"].tolist(), "auprc": per["auprc"].tolist()},
    }
    if kind == "multilabel":
        micro = _sk_binary(Y.ravel(), scores.ravel())
        out["auroc_micro"], out["auprc_micro"] = micro["auroc"], micro["auprc"]
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def bootstrap_ci(
    kind: str,
    y: np.ndarray,
    scores: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap CI of the headline AUROC / AUPRC (resampling slides).

    Resamples lacking a class give an undefined metric and are dropped (the count used is
    returned as ``n_valid``). Multi-class / multi-label CIs are of the macro average.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    idx = rng.integers(0, n, size=(n_boot, n))
    S = np.asarray(scores, dtype=np.float64)
    if kind == "binary":
        Y, S = np.asarray(y, dtype=np.float64)[:, None], S[:, None]
    elif kind == "multiclass":
        Y = one_hot(y, S.shape[1])
    elif kind == "multilabel":
        Y = np.asarray(y, dtype=np.float64)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    au = np.stack([binary_auroc(Y[idx, c], S[idx, c]) for c in range(S.shape[1])])
    ap = np.stack([binary_auprc(Y[idx, c], S[idx, c]) for c in range(S.shape[1])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns stay nan
        au_b, ap_b = np.nanmean(au, axis=0), np.nanmean(ap, axis=0)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, vals in (("auroc", au_b), ("auprc", ap_b)):
        ok = vals[np.isfinite(vals)]
        out[f"{name}_ci"] = (
            [float(np.percentile(ok, lo)), float(np.percentile(ok, hi))]
            if ok.size
            else [float("nan")] * 2
        )
    out["n_valid"] = int(np.isfinite(au_b).sum())
    return out
