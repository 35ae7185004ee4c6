"""k-fold linear probe of slide embeddings (logistic regression, C by inner CV).

For each task and each outer fold (patient-grouped, label-stratified, shared by every
method through the folds file, see ``eval.folds``):

1. standardise features with the mean / std of the outer training slides only;
2. choose ``C`` from a log grid by an inner patient-grouped stratified CV (3 folds) on the
   outer training slides, minimising the pooled validation log-loss (ties -> smaller C);
   the inner folds reuse the outer-training standardisation;
3. refit on all outer training slides with that ``C`` and score the test fold.

Multi-class tasks are one-vs-rest (one binary model, with its own C, per class; scores
normalised to sum to one), multi-label tasks one binary model per label. The solver is the
exact Newton method of ``eval.logreg`` (dual form when slides < features), warm-started
along the C path; (task, fold) jobs run on ``n_jobs`` threads with single-threaded BLAS.
Survival tasks (``NAME=surv:TIME:EVENT``) get the penalised Cox probe of ``eval.coxprobe``
on the same folds instead.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.special import expit
from threadpoolctl import threadpool_limits

from slidessl.data.tasks import Task
from slidessl.eval.coxprobe import DEFAULT_L1_RATIO, probe_survival
from slidessl.eval.folds import grouped_stratified_split, resolve_folds
from slidessl.eval.logreg import LogRegPath, fit_path, standardize
from slidessl.eval.results import summarize

log = logging.getLogger(__name__)
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def select_c(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs, inner_k: int = 3, seed: int = 0
) -> tuple[float, str]:
    """C with the lowest pooled inner-CV log-loss; ``(C, "inner-cv")`` or the grid's middle
    value with ``"default"`` when there are too few patients of a class for 2 inner folds.

    The grid is walked upwards (warm starts) and abandoned as soon as the pooled validation
    loss rises above its minimum: the loss is unimodal in log C in practice, and the large-C
    end (nearly separable data when slides < features) is the expensive one."""
    Cs = np.sort(np.asarray(Cs, dtype=np.float64))
    k_in = min(inner_k, len(set(groups[y == 1])), len(set(groups[y == 0])))
    if k_in < 2 or len(Cs) == 1:
        return float(Cs[len(Cs) // 2]), "default"
    inner_fold = grouped_stratified_split(y, groups, k_in, seed)
    inner = [
        (LogRegPath(X[inner_fold != f], y[inner_fold != f]), inner_fold == f)
        for f in range(k_in)
        if np.ptp(y[inner_fold != f]) > 0
    ]
    if not inner:
        return float(Cs[len(Cs) // 2]), "default"
    losses: list[float] = []
    for C in Cs:  # increasing; stop once the validation loss rises past its minimum
        loss = 0.0
        for path, va in inner:
            w, b = path.fit(float(C))
            f = X[va] @ w + b
            loss += float(np.sum(np.logaddexp(0.0, f) - y[va] * f))
        losses.append(loss)
        if loss > min(losses) * (1 + 1e-9):
            break
    return float(Cs[int(np.argmin(losses))]), "inner-cv"


def fit_predict_binary(Xtr, ytr, gtr, Xte, Cs, inner_k=3, seed=0) -> tuple[np.ndarray, float]:
    """Probability of class 1 for ``Xte`` and the chosen C (nan when ytr is constant)."""
    if ytr.min() == ytr.max():
        return np.full(len(Xte), float(ytr[0])), float("nan")
    C, _ = select_c(Xtr, ytr, gtr, Cs, inner_k, seed)
    path = [c for c in sorted(Cs) if c <= C]
    w, b = fit_path(Xtr, ytr, path)[-1]
    return expit(Xte @ w + b), C


def _fold_job(X, task: Task, fold, f, Cs, inner_k, seed):
    test, train = fold == f, fold != f
    Xs = standardize(X, train)
    groups = np.asarray(task.patient_ids)
    Xtr, gtr, Xte = Xs[train], groups[train], Xs[test]
    if task.kind == "binary":
        p, C = fit_predict_binary(Xtr, task.y[train], gtr, Xte, Cs, inner_k, seed)
        return p, [C]
    Y = task.y if task.kind == "multilabel" else np.eye(len(task.classes), dtype=np.int64)[task.y]
    cols, chosen = [], []
    for c in range(Y.shape[1]):
        p, C = fit_predict_binary(Xtr, Y[train, c], gtr, Xte, Cs, inner_k, seed)
        cols.append(p)
        chosen.append(C)
    S = np.stack(cols, axis=1)
    if task.kind == "multiclass":
        S = S / np.maximum(S.sum(axis=1, keepdims=True), 1e-12)
    return S, chosen


def probe_task(
    X: np.ndarray,
    task: Task,
    fold: np.ndarray,
    Cs=DEFAULT_CS,
    inner_k: int = 3,
    seed: int = 0,
    n_jobs: int = 2,
) -> tuple[np.ndarray, list[list[float]]]:
    """Out-of-fold scores of one task (rows of ``X`` aligned with ``task.slide_ids``)."""
    return probe_tasks([(X, task, fold)], Cs, inner_k, seed, n_jobs)[0]


def probe_tasks(items, Cs=DEFAULT_CS, inner_k=3, seed=0, n_jobs=2):
    """``items``: ``[(X, task, fold), ...]``; all (task, fold) fits share one thread pool."""
    jobs = [(i, f) for i, (_, _, fold) in enumerate(items) for f in range(int(fold.max()) + 1)]
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        futures = {
            job: pool.submit(
                _fold_job,
                items[job[0]][0],
                items[job[0]][1],
                items[job[0]][2],
                job[1],
                Cs,
                inner_k,
                seed,
            )
            for job in jobs
        }
        done = {job: fut.result() for job, fut in futures.items()}
    out = []
    for i, (X, task, fold) in enumerate(items):
        shape = (
            (len(X),)
            if task.kind == "binary"
            else (len(X), task.y.shape[1] if task.kind == "multilabel" else len(task.classes))
        )
        scores = np.zeros(shape)
        chosen = []
        for f in range(int(fold.max()) + 1):
            s, cs = done[(i, f)]
            scores[fold == f] = s
            chosen.append(cs)
        out.append((scores, chosen))
    return out


def align(
    task: Task, ids: list[str], X: np.ndarray, where: str
) -> tuple[Task, np.ndarray, np.ndarray]:
    """Restrict ``task`` to slides that have an embedding; returns (task, X rows, keep mask)."""
    index = {s: i for i, s in enumerate(ids)}
    keep = np.array([s in index for s in task.slide_ids])
    if not keep.any():
        raise ValueError(f"{where}: no embedding for any slide of task {task.name!r}")
    if not keep.all():
        log.warning(
            "%s: %d slides of task %r have no embedding and are left out",
            where,
            int((~keep).sum()),
            task.name,
        )
    sub = task.subset(keep)
    sub.meta["n_missing_embeddings"] = int((~keep).sum())
    return sub, X[[index[s] for s in sub.slide_ids]], keep


def run_probe(
    ids,
    X,
    tasks: list[Task],
    folds_path,
    k=10,
    seed=0,
    Cs=DEFAULT_CS,
    n_jobs=2,
    n_boot=1000,
    where="embeddings",
    l1_ratio=DEFAULT_L1_RATIO,
):
    """Probe every task; returns ``(tasks, folds, scores, summaries)`` aligned lists.
    Survival tasks get the Cox probe of ``eval.coxprobe`` (risk scores, C-indices)."""
    items, used_tasks, used_folds = [], [], []
    for task in tasks:
        fold_all = resolve_folds(task, folds_path, k, seed)
        sub, Xt, keep = align(task, ids, X, where)
        fold = fold_all[keep]
        items.append((Xt, sub, fold))
        used_tasks.append(sub)
        used_folds.append(fold)
    classify = [it for it in items if it[1].kind != "survival"]
    done = iter(probe_tasks(classify, Cs, 3, seed, n_jobs) if classify else [])
    results = [
        probe_survival(X, t, f, l1_ratio, 3, seed) if t.kind == "survival" else next(done)
        for X, t, f in items
    ]
    scores, summaries = [], []
    for (_, task, fold), (s, chosen) in zip(items, results):
        task.meta["alpha_per_fold" if task.kind == "survival" else "C_per_fold"] = chosen
        scores.append(s)
        summaries.append(summarize(task, fold, s, n_boot=n_boot, seed=seed))
    return used_tasks, used_folds, scores, summaries
