import numpy as np

from slidessl.data.tasks import Task
from slidessl.eval.folds import grouped_stratified_split, make_folds
from slidessl.eval.logreg import standardize as _standardize
from slidessl.eval.probe import probe_task
from slidessl.eval.results import summarize


def make(rng, n=200, d=40, kind="binary", signal=2.0):
    pids = [f"p{i // 2}" for i in range(n)]
    X = rng.standard_normal((n, d))
    if kind == "binary":
        y = (X[:, 0] * signal + rng.standard_normal(n) > 0).astype(int)
        classes = ["0", "1"]
    elif kind == "multiclass":
        y = np.argmax(X[:, :3] * signal + rng.standard_normal((n, 3)), axis=1)
        classes = ["a", "b", "c"]
    else:
        y = (X[:, :3] * signal + rng.standard_normal((n, 3)) > 0).astype(int)
        classes = ["g1", "g2", "g3"]
    return X, Task("t", kind, ["t"], classes, [f"s{i}" for i in range(n)], pids, y)


def test_probe_finds_planted_signal_in_each_task_kind(rng):
    for kind in ("binary", "multiclass", "multilabel"):
        X, task = make(rng, kind=kind)
        fold = make_folds(task, k=5, seed=0)
        scores, chosen = probe_task(X, task, fold, n_jobs=2)
        s = summarize(task, fold, scores, n_boot=200)
        assert s["auroc_mean"] > 0.8, (kind, s["auroc_mean"])
        assert len(chosen) == 5
        if kind == "multiclass":
            np.testing.assert_allclose(scores.sum(axis=1), 1.0)
        if kind == "multilabel":
            assert s["auroc_micro_mean"] > 0.8


def test_probe_on_noise_is_near_chance(rng):
    X, task = make(rng, n=300, signal=0.0)
    fold = make_folds(task, k=5, seed=0)
    scores, _ = probe_task(X, task, fold)
    s = summarize(task, fold, scores, n_boot=200)
    assert abs(s["auroc_pooled"] - 0.5) < 0.12


def test_scaling_uses_training_slides_only(rng):
    X = rng.standard_normal((50, 4))
    train = np.arange(50) < 40
    X2 = X.copy()
    X2[~train] = X2[~train] * 100 + 7
    np.testing.assert_allclose(_standardize(X, train)[train], _standardize(X2, train)[train])
    np.testing.assert_allclose(_standardize(X, train)[train].mean(0), 0, atol=1e-12)


def test_inner_split_is_grouped_and_stratified(rng):
    groups = np.repeat(np.arange(90), 2)
    y = np.repeat((rng.random(90) < 0.3).astype(int), 2)
    f = grouped_stratified_split(y, groups, 3, seed=1)
    for g in range(90):
        assert len(set(f[groups == g])) == 1
    for k in range(3):
        assert abs(y[f == k].mean() - y.mean()) < 0.08
