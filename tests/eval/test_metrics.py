import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from slidessl.eval.metrics import binary_auprc, binary_auroc, bootstrap_ci, task_metrics


@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_match_sklearn(rng, ties):
    for _ in range(20):
        n = int(rng.integers(5, 200))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 5, n).astype(float) if ties else rng.standard_normal(n)
        assert binary_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert binary_auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_rows_are_independent_problems(rng):
    Y = rng.integers(0, 2, (7, 50))
    Y[:, :2] = [0, 1]
    S = rng.standard_normal((7, 50))
    au, ap = binary_auroc(Y, S), binary_auprc(Y, S)
    for i in range(7):
        assert au[i] == pytest.approx(roc_auc_score(Y[i], S[i]))
        assert ap[i] == pytest.approx(average_precision_score(Y[i], S[i]))


def test_single_class_is_nan_not_a_number():
    assert np.isnan(binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(binary_auprc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        binary_auroc([0, 1], [np.nan, 0.2])


def test_multiclass_ovr_macro_matches_sklearn(rng):
    n, c = 150, 4
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.ones(c), n)
    m = task_metrics("multiclass", y, p)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    onehot = label_binarize(y, classes=range(c))
    assert m["auprc"] == pytest.approx(average_precision_score(onehot, p, average="macro"))


def test_multilabel_macro_and_micro_match_sklearn(rng):
    Y = rng.integers(0, 2, (120, 5))
    S = Y * 0.5 + rng.standard_normal((120, 5))
    m = task_metrics("multilabel", Y, S)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, S, average="macro"))
    assert m["auroc_micro"] == pytest.approx(roc_auc_score(Y, S, average="micro"))
    assert m["auprc"] == pytest.approx(average_precision_score(Y, S, average="macro"))
    assert m["auprc_micro"] == pytest.approx(average_precision_score(Y, S, average="micro"))
    assert m["per_class"]["auroc"][2] == pytest.approx(roc_auc_score(Y[:, 2], S[:, 2]))


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded(rng):
    y = rng.integers(0, 2, 300)
    s = y + rng.standard_normal(300)
    ci = bootstrap_ci("binary", y, s, n_boot=400, seed=3)
    est = roc_auc_score(y, s)
    lo, hi = ci["auroc_ci"]
    assert lo < est < hi and hi - lo < 0.2
    assert ci == bootstrap_ci("binary", y, s, n_boot=400, seed=3)
    # the same CI computed by brute force with the same resamples
    idx = np.random.default_rng(3).integers(0, 300, size=(400, 300))
    vals = [roc_auc_score(y[i], s[i]) for i in idx]
    assert lo == pytest.approx(np.percentile(vals, 2.5))
