"""Linear Cox probe of slide embeddings: elastic-net penalised Cox, penalty by inner CV.

For each outer fold of a survival task (the same folds file as every other method):

1. standardise the embeddings with the outer training slides' mean / std;
2. fit the whole penalty path of ``sksurv.linear_model.CoxnetSurvivalAnalysis`` (Simon et
   al. 2011, coordinate descent; ``l1_ratio`` 0.5 by default, ``N_ALPHAS`` penalties down
   to ``ALPHA_MIN_RATIO`` of the largest useful one) on the outer training slides;
3. choose the penalty by a patient-grouped inner CV (3 folds, stratified on the event)
   maximising the cross-validated partial log-likelihood of Verweij & van Houwelingen
   (1993): ``sum_f [l(beta_-f; inner data) - l(beta_-f; inner data without fold f)]``,
   which scores each left-out fold inside the risk sets of all the data (small folds
   alone would have tiny risk sets); ties go to the larger penalty;
4. the outer fit's coefficients at that penalty give the test slides' risk ``x . beta``.

scikit-survival's Coxnet is the well-kept implementation (it is what Patho-Bench's
``coxnet`` framework runs); the CV criterion needs the partial likelihood on held-out data,
which ``partial_log_likelihood`` takes from the Cox loss (Breslow's ties).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from slidessl.data.tasks import Task
from slidessl.eval.cox_loss import cox_ph_loss
from slidessl.eval.folds import grouped_stratified_split
from slidessl.eval.logreg import standardize
from slidessl.eval.survival import surv_array

log = logging.getLogger(__name__)
N_ALPHAS = 25
ALPHA_MIN_RATIO = 0.01
DEFAULT_L1_RATIO = 0.5


def partial_log_likelihood(eta, time, event) -> float:
    """Cox log partial likelihood of linear predictors ``eta``, Breslow's ties:
    ``sum_{i: event} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]`` - minus the loss ABMIL
    trains on (:func:`~slidessl.eval.cox_loss.cox_ph_loss`), in float64."""
    tensors = [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (eta, time, event)]
    return -float(cox_ph_loss(*tensors))


def fit_path(X, time, event, l1_ratio=DEFAULT_L1_RATIO, alphas=None):
    """``(alphas, coefs (p, n_alphas))`` of the Coxnet path on ``X`` (already scaled):
    ``alphas`` given, or ``N_ALPHAS`` from the largest useful penalty down to
    ``ALPHA_MIN_RATIO`` of it. When coordinate descent fails at the smallest penalties
    (nearly separable data: weights without bound) the automatic path stops 10x higher."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    y = surv_array(time, event)
    kw = {"l1_ratio": l1_ratio, "fit_baseline_model": False}
    tries = [{"alphas": np.asarray(alphas, dtype=float)}] if alphas is not None else [
        {"n_alphas": N_ALPHAS, "alpha_min_ratio": ALPHA_MIN_RATIO},
        {"n_alphas": N_ALPHAS, "alpha_min_ratio": ALPHA_MIN_RATIO * 10},
    ]  # fmt: skip
    for i, extra in enumerate(tries):
        try:
            model = CoxnetSurvivalAnalysis(**kw, **extra).fit(X, y)
        except ArithmeticError as exc:
            if i + 1 == len(tries):
                raise ValueError(f"Cox probe: coordinate descent failed ({exc})") from exc
            log.warning("Cox probe: path failed at small penalties (%s); stopping 10x higher", exc)
            continue
        return np.asarray(model.alphas_, dtype=np.float64), np.asarray(model.coef_)
    raise AssertionError("unreachable")


def select_alpha(X, time, event, groups, alphas, l1_ratio, inner_k=3, seed=0):
    """Index into ``alphas`` maximising the Verweij-van Houwelingen cross-validated partial
    log-likelihood over a patient-grouped inner split stratified on the event; the middle
    of the path with too few patients with an event for two inner folds."""
    event = np.asarray(event).astype(bool)
    k_in = min(inner_k, len(set(groups[event])), len(set(groups)))
    if k_in < 2:
        return len(alphas) // 2
    inner = grouped_stratified_split(event.astype(np.int64), groups, k_in, seed)
    cvpl = np.zeros(len(alphas))
    for f in range(k_in):
        tr = inner != f
        if not event[tr].any():
            continue
        _, coefs = fit_path(X[tr], time[tr], event[tr], l1_ratio, alphas)
        for a in range(coefs.shape[1]):
            beta = coefs[:, a]
            cvpl[a] += partial_log_likelihood(X @ beta, time, event) - partial_log_likelihood(
                X[tr] @ beta, time[tr], event[tr]
            )
    best = np.flatnonzero(cvpl >= cvpl.max() - 1e-9)
    return int(best[0])  # alphas decrease along the path: the first is the largest


def fit_predict_cox(Xtr, ytr, gtr, Xte, l1_ratio=DEFAULT_L1_RATIO, inner_k=3, seed=0):
    """Risk ``Xte @ beta`` of the Cox fit on ``(Xtr, ytr)`` and the chosen penalty."""
    time, event = ytr[:, 0], ytr[:, 1].astype(bool)
    if not event.any():
        return np.zeros(len(Xte)), float("nan")
    alphas, coefs = fit_path(Xtr, time, event, l1_ratio)
    a = select_alpha(Xtr, time, event, np.asarray(gtr), alphas, l1_ratio, inner_k, seed)
    return Xte @ coefs[:, a], float(alphas[a])


def probe_survival(
    X: np.ndarray,
    task: Task,
    fold: np.ndarray,
    l1_ratio: float = DEFAULT_L1_RATIO,
    inner_k: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, list[list[float]]]:
    """Out-of-fold risk of every slide (rows of ``X`` aligned with ``task.slide_ids``) and the
    penalty chosen in each fold."""
    groups = np.asarray(task.patient_ids)
    scores, chosen = np.zeros(len(X)), []
    for f in range(int(fold.max()) + 1):
        test, train = fold == f, fold != f
        if not test.any():
            chosen.append([float("nan")])
            continue
        Xs = standardize(X, train)
        s, alpha = fit_predict_cox(
            Xs[train], task.y[train], groups[train], Xs[test], l1_ratio, inner_k, seed
        )
        scores[test] = s
        chosen.append([alpha])
    return scores, chosen
