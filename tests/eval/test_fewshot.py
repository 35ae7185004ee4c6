"""Few-shot probes: the shots sampler (K patients per class, no replacement, seeded, no test
patient in training) and the probe's scores."""

import numpy as np
import pytest

from slidessl.data.tasks import Task
from slidessl.eval.fewshot import _rng, draw_shots, fewshot_task, parse_shots


def _task(rng, kind="binary", n_patients=30):
    sizes = rng.choice([1, 2, 3], n_patients, p=[0.6, 0.3, 0.1])
    patients = np.repeat([f"p{i}" for i in range(n_patients)], sizes)
    if kind == "multilabel":
        per = rng.integers(0, 2, (n_patients, 3))
        y = np.repeat(per, sizes, axis=0)
        classes = ["a", "b", "c"]
    else:
        n_cls = 2 if kind == "binary" else 3
        y = np.repeat(np.arange(n_patients) % n_cls, sizes)
        classes = [str(c) for c in range(n_cls)]
    ids = [f"s{i}" for i in range(len(patients))]
    return Task("t", kind, ["t"], classes, ids, list(patients), y)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sampler_draws_k_patients_per_class_without_replacement(rng, k):
    task = _task(rng, "multiclass")
    pats = np.asarray(task.patient_ids)
    for d in range(20):
        train, test = draw_shots(task.y, pats, k, _rng(7, "t", k, d))
        train_pats = pats[train]
        assert len(train) == 3 * k and len(set(train_pats)) == 3 * k  # one slide per patient
        for c in range(3):
            assert np.sum(task.y[train] == c) == k
        assert not set(pats[test]) & set(train_pats)  # no test patient in training
        assert set(test) | set(train) <= set(range(len(pats)))
        assert set(pats[test]) | set(train_pats) == set(pats)  # every other patient tested
    a = draw_shots(task.y, pats, k, _rng(7, "t", k, 3))
    b = draw_shots(task.y, pats, k, _rng(7, "t", k, 3))
    c = draw_shots(task.y, pats, k, _rng(8, "t", k, 3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # deterministic from its seed
    assert not np.array_equal(a[0], c[0])


def test_sampler_refuses_a_class_with_too_few_patients(rng):
    task = _task(rng, "binary", n_patients=6)
    with pytest.raises(ValueError, match="patients left"):
        draw_shots(task.y, np.asarray(task.patient_ids), 4, _rng(0, "t", 4, 0))


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_fewshot_scores_follow_the_signal(rng, kind):
    """A vector that carries the label scores near 1 already at K=1; noise near chance;
    the same draws for two methods (same slides) and a summary per K."""
    task = _task(rng, kind, n_patients=40)
    y = np.eye(3)[task.y] if kind == "multiclass" else task.y.reshape(len(task.y), -1)
    informative = np.hstack([4 * y, rng.standard_normal((len(y), 6))])
    noise = rng.standard_normal((len(y), 8))
    good = fewshot_task(informative, task, shots=(1, 4), draws=10, seed=1)
    bad = fewshot_task(noise, task, shots=(1, 4), draws=10, seed=1)
    assert good["metric"] == ("balanced_accuracy" if kind == "multiclass" else "auroc")
    assert good["4"]["mean"] > 0.9 and good["1"]["n_draws"] == 10
    chance = 1 / 3 if kind == "multiclass" else 0.5
    assert abs(bad["4"]["mean"] - chance) < 0.15
    assert good["mean_over_k"] == pytest.approx((good["1"]["mean"] + good["4"]["mean"]) / 2)
    again = fewshot_task(informative, task, shots=(1, 4), draws=10, seed=1)
    assert again["1"]["scores"] == good["1"]["scores"]


def test_parse_shots():
    assert parse_shots("1,2, 4,8") == (1, 2, 4, 8)
    for bad in ("0,1", "a", ""):
        with pytest.raises(ValueError, match="positive integers"):
            parse_shots(bad)


def test_abmil_scorer_runs_on_the_same_draws(rng):
    """ABMIL as the few-shot classifier: it sees exactly the draws the logistic probe sees
    and learns a tile-level signal from K = 4 slides per class."""
    import torch

    from slidessl.eval.abmil import ABMILConfig, fewshot_scorer

    task = _task(rng, "binary", n_patients=24)
    feats = []
    for y in task.y:
        x = rng.standard_normal((30, 6))
        x[:5, 0] += 3.0 * y  # a few positive-class tiles
        feats.append(torch.as_tensor(x, dtype=torch.float32))
    cfg = ABMILConfig(epochs=15, lr=5e-3, train_tiles=30, proj_dim=16, attn_dim=8, dropout=0.0)
    seen = []
    abmil = fewshot_scorer(feats, task, cfg)

    def spy(train, y_train, test, multiclass):
        seen.append(tuple(train))
        return abmil(train, y_train, test, multiclass)

    res = fewshot_task(None, task, shots=(4,), draws=3, seed=2, scorer=spy)
    assert res["4"]["mean"] > 0.8
    logged = []
    fewshot_task(
        rng.standard_normal((len(task.y), 3)), task, shots=(4,), draws=3, seed=2,
        scorer=lambda tr, yt, te, mc: (logged.append(tuple(tr)), np.zeros(len(te)))[1],
    )  # fmt: skip
    assert seen == logged
