"""Few-shot linear probes of slide embeddings: K labelled patients per class, many draws.

TITAN's few-shot protocol (Ding et al., 2024, "Multimodal whole slide foundation model for
pathology", arXiv:2411.19666; as Patho-Bench runs it): where pretraining must pay is when
labels are few. For each task, each ``K`` in ``shots`` and each of ``draws`` draws:

1. **the shots**: per class, ``K`` patients drawn without replacement among the patients
   that have a slide of that class (a patient is drawn for one class at most), and one of
   that patient's slides of the class, uniformly. Multi-label tasks: per label, ``K``
   positive and ``K`` negative patients, each label a binary problem of its own;
2. **the model**: L2 logistic regression (scikit-learn, ``C`` = 1, multinomial for
   multi-class) on the shots' vectors, standardised with the mean / std of *all* slides of
   the task (label-free statistics: no label enters them); or any other classifier given
   as a ``scorer`` (ABMIL on the shots' tiles), on the same draws;
3. **the test set**: every slide of every patient not drawn;
4. **the metric**: AUROC (binary), balanced accuracy (multi-class), macro AUROC over
   labels (multi-label).

Draws are a function of ``(seed, task name, K, draw)`` and of the task's slides only: every
method probed on the same slides sees the same shots. Reported: mean and std over draws per
K, and the mean over K of the per-K means (``mean_over_k``).

Example::

    res = fewshot_task(X, task, shots=(1, 2, 4, 8), draws=50, seed=0)
    res["4"]["mean"], res["mean_over_k"]
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np

from slidessl.data.tasks import Task

__all__ = [
    "FEWSHOT_METRIC",
    "draw_shots",
    "fewshot_task",
    "format_fewshot",
    "logistic_scorer",
    "parse_shots",
    "run_fewshot",
]

FEWSHOT_METRIC = {"binary": "auroc", "multiclass": "balanced_accuracy", "multilabel": "auroc"}


def parse_shots(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; every K a positive integer."""
    try:
        shots = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError as exc:
        raise ValueError(f"--shots {text!r}: give positive integers, e.g. 1,2,4,8") from exc
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots {text!r}: give positive integers, e.g. 1,2,4,8")
    return shots


def _rng(seed: int, name: str, k: int, draw: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(k), int(draw)])


def draw_shots(
    classes: np.ndarray, patients, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, test rows)``: ``k`` patients per class (``classes`` (n,) int per
    slide), without replacement, one slide of the class each; test = every slide of every
    patient not drawn. A class with fewer than ``k`` free patients is an error."""
    classes = np.asarray(classes)
    patients = np.asarray(patients)
    taken: set = set()
    train = []
    for c in np.unique(classes):
        free = sorted({p for p in patients[classes == c]} - taken)
        if len(free) < k:
            raise ValueError(
                f"{k}-shot: class {c} has {len(free)} patients left to draw, needs {k}"
            )
        chosen = rng.choice(len(free), size=k, replace=False)
        for i in chosen:
            p = free[int(i)]
            taken.add(p)
            rows = np.flatnonzero((patients == p) & (classes == c))
            train.append(int(rows[rng.integers(len(rows))]))
    test = np.flatnonzero(~np.isin(patients, list(taken)))
    return np.array(train, dtype=np.int64), test


def _standardize(X: np.ndarray) -> np.ndarray:
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd[sd < 1e-8] = np.inf
    return (X - mu) / sd


def logistic_scorer(X: np.ndarray):
    """The default classifier of a draw: L2 logistic regression (C = 1) on vectors
    standardised with all slides' label-free mean / std. Returns ``fit(train, y_train,
    test, multiclass) -> scores`` (binary: P(positive); multi-class: (n_test, C))."""
    from sklearn.linear_model import LogisticRegression

    Z = _standardize(np.asarray(X, dtype=np.float64))

    def fit(train, y_train, test, multiclass: bool) -> np.ndarray:
        model = LogisticRegression(C=1.0, max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny separable sets converge slowly: expected
            model.fit(Z[train], y_train)
        proba = model.predict_proba(Z[test])
        return proba if multiclass else proba[:, 1]

    return fit


def _binary_score(fit, y, patients, k, rng) -> float:
    from sklearn.metrics import roc_auc_score

    train, test = draw_shots(y, patients, k, rng)
    if len(np.unique(y[test])) < 2:
        return float("nan")
    return float(roc_auc_score(y[test], fit(train, y[train], test, False)))


def _one_draw(fit, task: Task, k: int, rng) -> float:
    pats = np.asarray(task.patient_ids)
    if task.kind == "binary":
        return _binary_score(fit, task.y, pats, k, rng)
    if task.kind == "multiclass":
        from sklearn.metrics import balanced_accuracy_score

        train, test = draw_shots(task.y, pats, k, rng)
        proba = fit(train, task.y[train], test, True)
        labels = np.unique(task.y[train])
        return float(balanced_accuracy_score(task.y[test], labels[proba.argmax(axis=1)]))
    scores = [_binary_score(fit, task.y[:, j], pats, k, rng) for j in range(task.y.shape[1])]
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def fewshot_task(
    X, task: Task, shots=(1, 2, 4, 8), draws: int = 50, seed: int = 0, scorer=None
) -> dict:
    """``{str(K): {"mean", "std", "n_draws", "scores"}, "metric", "mean_over_k"}`` for one
    task (rows of ``X`` aligned with ``task.slide_ids``); a K that not every class can
    supply is left out (``skipped_shots``). ``scorer``: a ``fit(train, y_train, test,
    multiclass)`` of another classifier (e.g. ABMIL on tile features) in place of the
    logistic regression on ``X``: the same draws."""
    fit = scorer if scorer is not None else logistic_scorer(X)
    out: dict = {"metric": FEWSHOT_METRIC[task.kind], "draws": int(draws), "seed": int(seed)}
    skipped = []
    for k in shots:
        try:
            scores = [
                _one_draw(fit, task, int(k), _rng(seed, task.name, k, d)) for d in range(draws)
            ]
        except ValueError:
            skipped.append(int(k))
            continue
        s = np.array(scores, dtype=np.float64)
        out[str(int(k))] = {
            "mean": float(np.nanmean(s)),
            "std": float(np.nanstd(s, ddof=1)) if np.isfinite(s).sum() > 1 else float("nan"),
            "n_draws": int(np.isfinite(s).sum()),
            "scores": s.tolist(),
        }
    means = [out[str(int(k))]["mean"] for k in shots if str(int(k)) in out]
    out["mean_over_k"] = float(np.mean(means)) if means else float("nan")
    out["skipped_shots"] = skipped
    return out


def run_fewshot(ids, X, tasks: list[Task], shots=(1, 2, 4, 8), draws=50, seed=0, where=""):
    """Few-shot results of every task: ``{task name: fewshot_task(...)}`` (slides without an
    embedding are left out of the task, as in the k-fold probe)."""
    from slidessl.eval.probe import align

    return {
        t.name: fewshot_task(Xt, sub, shots, draws, seed)
        for t in tasks
        for sub, Xt, _ in [align(t, ids, X, where or "embeddings")]
    }


def format_fewshot(method: str, res: dict, shots) -> str:
    """One line per task: mean ± std over draws per K and the mean over K."""
    lines = []
    for task, r in res.items():
        cells = [
            f"K={k} {r[str(k)]['mean']:.3f} ± {r[str(k)]['std']:.3f}" for k in shots if str(k) in r
        ]
        lines.append(
            f"{method} {task} few-shot {r['metric']} ({r['draws']} draws): "
            + ", ".join(cells)
            + f"; mean over K {r['mean_over_k']:.3f}"
        )
    return "\n".join(lines)
