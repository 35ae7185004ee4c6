import numpy as np
import torch

from slidessl.data.tasks import Task
from slidessl.eval.abmil import ABMILConfig, run_abmil
from slidessl.eval.folds import make_folds
from slidessl.eval.metrics import binary_auroc


def test_abmil_learns_a_planted_needle(rng):
    """The class lives in which features co-occur within a tile: slide means are equal."""
    n, d = 90, 8
    y = (rng.random(n) < 0.5).astype(int)
    y[:2] = [0, 1]
    feats = {}
    for i in range(n):
        k = int(rng.integers(40, 80))
        x = rng.standard_normal((k, d))
        rows = rng.choice(k, 12, replace=False)
        if y[i]:  # six tiles high on both dims 0 and 1
            x[rows[:6], :2] += 4.0
        else:  # six tiles high on dim 0, six others on dim 1: same slide means
            x[rows[:6], 0] += 4.0
            x[rows[6:], 1] += 4.0
        feats[f"s{i}"] = torch.as_tensor(x, dtype=torch.float32)
    task = Task(
        "needle", "binary", ["needle"], ["0", "1"], list(feats), [f"p{i}" for i in range(n)], y
    )
    fold = make_folds(task, k=3, seed=0)
    cfg = ABMILConfig(
        epochs=25,
        patience=6,
        lr=1e-3,
        batch_size=4,
        train_tiles=64,
        proj_dim=32,
        attn_dim=16,
        seed=int(rng.integers(100)),
    )
    tasks, folds, scores, logs = run_abmil(feats, [task], [fold], cfg, progress=False)
    assert scores[0].shape == (n,)
    assert binary_auroc(y, scores[0]) > 0.85
    assert all(f["epochs"] >= 1 for f in logs[0])
    mean_x = np.stack([feats[f"s{i}"][:, :2].mean(0).numpy() for i in range(n)])
    mean_auc = max(binary_auroc(y, mean_x[:, 0]), binary_auroc(y, mean_x[:, 1]))
    assert mean_auc < 0.75


def test_abmil_scores_do_not_depend_on_the_thread_count(rng):
    """Trainings on two threads draw weights and dropout from streams of their own: the
    scores equal those of one thread, run after run."""
    n, d = 40, 6
    y = np.r_[0, 1, (rng.random(n - 2) < 0.5).astype(int)]
    feats = {
        f"s{i}": torch.as_tensor(rng.standard_normal((int(rng.integers(10, 30)), d)) + y[i],
                                 dtype=torch.float32)
        for i in range(n)
    }  # fmt: skip
    tasks = [
        Task(name, "binary", [name], ["0", "1"], list(feats), [f"p{i}" for i in range(n)], y)
        for name in ("a", "b")
    ]
    folds = [make_folds(t, k=2, seed=0) for t in tasks]
    cfg = ABMILConfig(epochs=3, batch_size=4, train_tiles=8, proj_dim=8, attn_dim=4, seed=3)
    one = run_abmil(feats, tasks, folds, cfg, progress=False, n_jobs=1)[2]
    for _ in range(2):
        two = run_abmil(feats, tasks, folds, cfg, progress=False, n_jobs=2)[2]
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a, b)
