"""Survival metrics of out-of-fold risk scores: C-index, Kaplan-Meier split, log-rank.

Follow-up belongs to a patient, so every statistic here is **per patient**: a patient's risk
is the mean of its slides' out-of-fold risks (their slides share time and event, which
``data.tasks`` checks), and the bootstrap resamples patients.

- Harrell's C-index (:func:`harrell_cindex`): over comparable pairs - ``i`` had the event
  and ``t_i < t_j``, or ``t_i == t_j`` with ``j`` censored (censored at the same time
  counts as surviving longer, scikit-survival's convention) - the share where the higher
  risk belongs to ``i``, ties in risk counting one half. Written over all pairs at once so
  that a thousand bootstrap resamples are one array expression; tested against a
  pair-by-pair count and ``sksurv.metrics.concordance_index_censored``.
- Uno's C-index: ``sksurv.metrics.concordance_index_ipcw`` (inverse probability of
  censoring weights from the pooled follow-up), truncated at ``tau`` = the 80th percentile
  of the observed times (stated in every result as ``uno_tau``).
- Kaplan-Meier curves of the patients above and at-or-below the median pooled risk and the
  log-rank test between them (``sksurv.nonparametric.kaplan_meier_estimator``,
  ``sksurv.compare.compare_survival``).
"""

from __future__ import annotations

import logging
import math

import numpy as np

UNO_TAU_QUANTILE = 0.8
# scikit-survival imports numexpr, which logs its thread count at INFO on import: not news
logging.getLogger("numexpr.utils").setLevel(logging.WARNING)


def per_patient(patient_ids, y: np.ndarray, risk: np.ndarray):
    """``(patients, time, event, mean risk)`` with one entry per patient (first-seen order)."""
    pids = np.asarray(patient_ids)
    uniq, first, inv = np.unique(pids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-seen order, deterministic
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inv = rank[inv.reshape(-1)]
    counts = np.bincount(inv, minlength=len(uniq))
    mean_risk = np.bincount(inv, np.asarray(risk, dtype=np.float64), len(uniq)) / counts
    y = np.asarray(y, dtype=np.float64)
    return uniq[order], y[first[order], 0], y[first[order], 1].astype(bool), mean_risk


def harrell_cindex(time, event, risk) -> np.ndarray | float:
    """Harrell's C; ``time``, ``event``, ``risk`` (n,) or (B, n) (rows independent); nan
    without a comparable pair."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64)
    one = r.ndim == 1
    if one:
        t, e, r = t[None], e[None], r[None]
    if not np.all(np.isfinite(r)):
        raise ValueError("risk scores contain NaN or inf")
    ti, tj = t[:, :, None], t[:, None, :]
    comparable = e[:, :, None] & ((ti < tj) | ((ti == tj) & ~e[:, None, :]))
    ri, rj = r[:, :, None], r[:, None, :]
    n_pairs = comparable.sum(axis=(1, 2))
    wins = (comparable & (ri > rj)).sum(axis=(1, 2))
    ties = (comparable & (ri == rj)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (wins + 0.5 * ties) / n_pairs
    c = np.where(n_pairs > 0, c, np.nan)
    return float(c[0]) if one else c


def bootstrap_cindex(time, event, risk, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap CI of Harrell's C, resampling patients; ``([lo, hi], n_valid)``.
    Resamples are scored in blocks of about 2e7 pairs (boolean arrays: ~60 MB at a time)."""
    t, e, r = (np.asarray(a) for a in (time, event, risk))
    n = len(t)
    chunk = max(1, int(2e7 // max(n * n, 1)))
    rng = np.random.default_rng([seed, 11])
    values = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        values.append(harrell_cindex(t[idx], e[idx], r[idx]))
    v = np.concatenate(values) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [float("nan"), float("nan")], 0
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))], int(v.size)


def surv_array(time, event):
    """scikit-survival's structured ``(event, time)`` array."""
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, float))


def uno_cindex(time, event, risk, tau: float | None = None) -> tuple[float, float]:
    """Uno's IPCW C-index truncated at ``tau`` (default: the 80th percentile of ``time``),
    censoring weights from these patients; ``(C, tau)`` (nan when it cannot be computed)."""
    from sksurv.metrics import concordance_index_ipcw

    t = np.asarray(time, dtype=np.float64)
    tau = float(np.quantile(t, UNO_TAU_QUANTILE)) if tau is None else float(tau)
    y = surv_array(t, event)
    try:
        c = concordance_index_ipcw(y, y, np.asarray(risk, dtype=np.float64), tau=tau)[0]
    except ValueError:  # e.g. the censoring distribution reaches zero before tau
        return float("nan"), tau
    return float(c), tau


def kaplan_meier(time, event) -> tuple[np.ndarray, np.ndarray]:
    """``(times, survival)`` step points of the Kaplan-Meier estimate, starting at (0, 1)."""
    from sksurv.nonparametric import kaplan_meier_estimator

    x, s = kaplan_meier_estimator(np.asarray(event, dtype=bool), np.asarray(time, float))
    return np.concatenate([[0.0], x]), np.concatenate([[1.0], s])


def logrank(time, event, group) -> tuple[float, float]:
    """Log-rank test between the groups of ``group``; ``(chi2, p)`` (nan with one group)."""
    from sksurv.compare import compare_survival

    group = np.asarray(group)
    if len(np.unique(group)) < 2:
        return float("nan"), float("nan")
    chi2, p = compare_survival(surv_array(time, event), group)
    return float(chi2), float(p)


def median_split(time, event, risk) -> dict:
    """High (risk above the median) vs low risk groups: sizes, events, log-rank."""
    risk = np.asarray(risk, dtype=np.float64)
    thr = float(np.median(risk))
    high = risk > thr
    chi2, p = logrank(time, event, high.astype(int))
    ev = np.asarray(event, dtype=bool)
    return {
        "threshold": thr,
        "n_high": int(high.sum()),
        "n_low": int((~high).sum()),
        "events_high": int(ev[high].sum()),
        "events_low": int(ev[~high].sum()),
        "logrank_chi2": chi2,
        "logrank_p": p,
    }


def summarize_survival(task, fold: np.ndarray, scores: np.ndarray, n_boot=1000, seed=0) -> dict:
    """Statistics of a survival task from out-of-fold risks (``scores`` (n,), per slide):
    per-fold Harrell's C (mean +- std over folds), pooled Harrell's C with a bootstrap CI,
    Uno's C, and the median split's log-rank test - all per patient."""
    per_fold = []
    for f in range(int(fold.max()) + 1):
        sel = fold == f
        if not sel.any():
            continue
        pids = np.asarray(task.patient_ids)[sel]
        _, t, e, r = per_patient(pids, task.y[sel], scores[sel])
        per_fold.append({"fold": f, "n_test": int(sel.sum()), "cindex": harrell_cindex(t, e, r)})
    _, t, e, r = per_patient(task.patient_ids, task.y, scores)
    c = [x["cindex"] for x in per_fold if math.isfinite(x["cindex"])]
    ci, n_valid = bootstrap_cindex(t, e, r, n_boot, seed)
    uno, tau = uno_cindex(t, e, r)
    return {
        "kind": task.kind,
        "columns": task.columns,
        "classes": task.classes,
        "n_slides": len(task.slide_ids),
        "n_patients": len(t),
        "n_events": int(e.sum()),
        "n_missing_labels": task.n_missing,
        "k": int(fold.max()) + 1,
        "cindex_mean": float(np.mean(c)) if c else float("nan"),
        "cindex_std": float(np.std(c, ddof=1)) if len(c) > 1 else float("nan"),
        "n_folds_scored": len(c),
        "cindex_pooled": harrell_cindex(t, e, r),
        "cindex_ci": ci,
        "n_boot_valid": n_valid,
        "uno_cindex": uno,
        "uno_tau": tau,
        "median_split": median_split(t, e, r),
        "per_fold": per_fold,
        **task.meta,
    }
