import numpy as np
import torch

from slidessl.eval.abmil import ABMILConfig, run_abmil
from slidessl.eval.folds import make_folds
from slidessl.eval.metrics import binary_auroc
from slidessl.eval.tasks import Task


def test_abmil_learns_a_planted_needle(rng):
    """Positive slides hide a few marker tiles among many; the slide mean barely moves."""
    n, d = 90, 8
    y = (rng.random(n) < 0.5).astype(int)
    y[:2] = [0, 1]
    feats = {}
    for i in range(n):
        k = int(rng.integers(40, 80))
        x = rng.standard_normal((k, d))
        if y[i]:
            x[rng.choice(k, 3, replace=False), 0] += 4.0
        feats[f"s{i}"] = torch.as_tensor(x, dtype=torch.float32)
    task = Task(
        "needle", "binary", ["needle"], ["0", "1"], list(feats), [f"p{i}" for i in range(n)], y
    )
    fold = make_folds(task, k=3, seed=0)
    cfg = ABMILConfig(
        epochs=25,
        patience=6,
        lr=1e-3,
        batch_size=8,
        train_tiles=64,
        proj_dim=32,
        attn_dim=16,
        seed=int(rng.integers(100)),
    )
    tasks, folds, scores, logs = run_abmil(feats, [task], [fold], cfg, progress=False)
    assert scores[0].shape == (n,)
    assert binary_auroc(y, scores[0]) > 0.85
    assert all(f["epochs"] >= 1 for f in logs[0])
    mean_auc = binary_auroc(y, np.array([feats[f"s{i}"][:, 0].mean().item() for i in range(n)]))
    assert mean_auc < binary_auroc(y, scores[0])
