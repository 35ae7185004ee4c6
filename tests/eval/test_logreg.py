import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from slidessl.eval.logreg import LogRegPath, fit_path


@pytest.mark.parametrize("n,d", [(60, 150), (300, 20)])  # dual form, primal form
def test_matches_sklearn_on_its_objective(rng, n, d):
    X = rng.standard_normal((n, d))
    y = (X[:, 0] + rng.standard_normal(n) > 0.3).astype(int)
    Cs = [1e-3, 0.1, 3.0]
    for C, (w, b) in zip(Cs, fit_path(X, y, Cs)):
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(X, y)
        scale = np.abs(ref.coef_).max()
        assert np.abs(ref.coef_[0] - w).max() < 1e-4 * scale
        assert b == pytest.approx(ref.intercept_[0], abs=1e-4 * max(1.0, abs(b)))


def test_order_of_cs_does_not_matter(rng):
    X = rng.standard_normal((40, 10))
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    a = fit_path(X, y, [1.0, 0.01])
    b = fit_path(X, y, [0.01, 1.0])
    np.testing.assert_allclose(a[0][0], b[1][0], rtol=1e-6, atol=1e-9)


def test_errors():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="both classes"):
        LogRegPath(X, np.ones(4))
    path = LogRegPath(np.eye(4), np.array([0, 1, 0, 1]))
    path.fit(1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        path.fit(0.1)
