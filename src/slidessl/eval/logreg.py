"""L2-regularised binary logistic regression by Newton's method, fast enough for k-fold probes.

Same objective as scikit-learn's ``LogisticRegression(C=C)`` (unpenalised intercept)::

    min_{w,b}  sum_i log(1 + exp(-s_i (x_i.w + b))) + ||w||^2 / (2 C)

Solved exactly by Newton steps with a backtracking line search, warm-started along an
increasing ``C`` path. When there are fewer training slides than features (the usual case
for slide embeddings: ~1,000 slides of 768-1,536 dims) the solve runs in the dual
(representer) form ``w = X^T a``: each Newton step is one Cholesky factorisation of the
n x n matrix ``X X^T + diag(1 / (C p (1 - p)))`` instead of a d x d Hessian, and the C path
reuses the previous solution. Otherwise the primal (d + 1) Newton system is solved.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.special import expit

_W_MIN = 1e-12


def standardize(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``X`` scaled by the mean / std of the rows ``train`` (a constant feature -> 0)."""
    mu = X[train].mean(axis=0)
    sd = X[train].std(axis=0)
    sd[sd < 1e-8] = np.inf  # constant on the training slides: carries no information
    return (X - mu) / sd


def _objective(f: np.ndarray, y: np.ndarray, penalty: float) -> float:
    return float(np.sum(np.logaddexp(0.0, f) - y * f) + penalty)


class LogRegPath:
    """Solutions for increasing values of ``C`` on one training set, each warm-started from
    the previous one. ``fit(C)`` returns ``(w (d,), b)``; ``y`` holds 0/1 labels."""

    def __init__(self, X: np.ndarray, y: np.ndarray, tol: float = 1e-7, max_iter: int = 50):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"expected X (n, d) and y (n,), got {X.shape} and {y.shape}")
        if y.size == 0 or y.min() == y.max():
            raise ValueError("logistic regression needs both classes in the training set")
        n, d = X.shape
        self.X, self.y, self.tol, self.max_iter = X, y, tol, max_iter
        # Cholesky of n x n (dual) against Hessian + solve in d (primal): pick the cheaper.
        self.dual = n**3 / 3 <= n * d * d + 2 * d**3 / 3
        if self.dual:
            self.K = X @ X.T
            self.K32 = self.K.astype(np.float32)
            self.a = np.zeros(n)
        else:
            self.Xa = np.hstack([X, np.ones((n, 1))])
            self.theta = np.zeros(d + 1)
        self.b = 0.0
        self.last_c = 0.0
        self.iterations = 0

    def fit(self, C: float) -> tuple[np.ndarray, float]:
        if not C > 0:
            raise ValueError(f"C must be positive, got {C}")
        if C < self.last_c:
            raise ValueError("LogRegPath.fit needs non-decreasing C (warm-started path)")
        self.last_c = C
        if self.dual:
            self._newton_dual(1.0 / C)
            return self.X.T @ self.a, self.b
        self._newton_primal(1.0 / C)
        return self.theta[:-1].copy(), float(self.theta[-1])

    def _done(self, old: float, new: float) -> bool:
        self.iterations += 1
        return old - new <= self.tol * (abs(old) + 1.0)

    def _newton_dual(self, lam: float) -> None:
        K, y, a, b = self.K, self.y, self.a, self.b
        n = len(y)
        ones = np.ones(n)
        diag = np.diag_indices(n)
        Ka = K @ a
        obj = _objective(Ka + b, y, 0.5 * lam * a @ Ka)
        for _ in range(self.max_iter):
            p = expit(Ka + b)
            w = np.maximum(p * (1 - p), _W_MIN)
            # float32 factorisation: twice as fast; the line search keeps each step a descent
            A = self.K32.copy()
            A[diag] += (lam / w).astype(np.float32)
            cf = cho_factor(A, lower=True, overwrite_a=True, check_finite=False)
            rhs = np.stack([-(p - y + lam * a) / w, ones], axis=1).astype(np.float32)
            u, v = cho_solve(cf, rhs, overwrite_b=True, check_finite=False).astype(np.float64).T
            db = (u.sum() + a.sum()) / v.sum()  # keeps sum(a) = 0: the intercept's condition
            da = u - v * db
            Kda = K @ da
            step = 1.0
            while True:
                a_new, b_new, Ka_new = a + step * da, b + step * db, Ka + step * Kda
                new = _objective(Ka_new + b_new, y, 0.5 * lam * a_new @ Ka_new)
                if new <= obj or step < 1e-6:
                    break
                step *= 0.5
            a, b, Ka = a_new, b_new, Ka_new
            done, obj = self._done(obj, new), new
            if done:
                break
        self.a, self.b = a, b

    def _newton_primal(self, lam: float) -> None:
        Xa, y, theta = self.Xa, self.y, self.theta
        d = Xa.shape[1] - 1
        reg = np.full(d + 1, lam)
        reg[-1] = 0.0  # unpenalised intercept
        f = Xa @ theta
        obj = _objective(f, y, 0.5 * lam * theta[:d] @ theta[:d])
        for _ in range(self.max_iter):
            p = expit(f)
            w = np.maximum(p * (1 - p), _W_MIN)
            H = (Xa * w[:, None]).T @ Xa
            H[np.diag_indices(d + 1)] += reg + 1e-10
            direction = -np.linalg.solve(H, Xa.T @ (p - y) + reg * theta)
            Xd = Xa @ direction
            step = 1.0
            while True:
                th_new, f_new = theta + step * direction, f + step * Xd
                new = _objective(f_new, y, 0.5 * lam * th_new[:d] @ th_new[:d])
                if new <= obj or step < 1e-6:
                    break
                step *= 0.5
            theta, f = th_new, f_new
            done, obj = self._done(obj, new), new
            if done:
                break
        self.theta = theta


def fit_path(
    X: np.ndarray, y: np.ndarray, Cs, tol: float = 1e-7, max_iter: int = 50
) -> list[tuple[np.ndarray, float]]:
    """One model per ``C`` (any order), warm-started in increasing C; ``[(w, b), ...]`` in
    the order given. ``y`` holds 0/1 labels; both classes must be present."""
    Cs = np.asarray(Cs, dtype=np.float64)
    path = LogRegPath(X, y, tol, max_iter)
    out: list = [None] * len(Cs)
    for i in np.argsort(Cs, kind="stable"):
        out[i] = path.fit(float(Cs[i]))
    return out
