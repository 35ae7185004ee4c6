import numpy as np
import pytest

from slidessl.eval.prototypes import (
    cooccurrence,
    fit_prototypes,
    parse_prototype_spec,
    slide_vector,
)


def _grid(rng, n, side):
    cells = rng.choice(side * side, n, replace=False)
    return np.stack([cells % side, cells // side], axis=1) + rng.integers(0, 50, 2)


def _brute(grid, assign, radius):
    k = assign.shape[1]
    out = np.zeros((k, k))
    for i in range(len(grid)):
        for j in range(len(grid)):
            d = np.abs(grid[i] - grid[j]).max()
            if 0 < d <= radius:
                out += np.outer(assign[i], assign[j])
    return out


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_cooccurrence_equals_brute_force(rng, radius):
    grid = _grid(rng, 120, 14)
    hard = np.eye(5)[rng.integers(0, 5, len(grid))]
    np.testing.assert_array_equal(cooccurrence(grid, hard, radius), _brute(grid, hard, radius))
    soft = rng.dirichlet(np.ones(5), len(grid))
    np.testing.assert_allclose(cooccurrence(grid, soft, radius), _brute(grid, soft, radius))


def test_cooccurrence_of_a_line():
    grid = np.array([[0, 0], [1, 0], [2, 0], [5, 0]])
    lab = np.eye(2)[[0, 1, 0, 1]]
    # radius 1: pairs (0,1), (1,2) both directions -> a-b 2 each way
    np.testing.assert_array_equal(cooccurrence(grid, lab, 1), [[0, 2], [2, 0]])
    # radius 3 adds (0,2) [a-a] and (2,3) [a-b]
    np.testing.assert_array_equal(cooccurrence(grid, lab, 3), [[2, 3], [3, 0]])


def _slides(rng, n=12, d=10, types=3):
    centres = rng.normal(size=(types, d)) * 4
    out = []
    for _ in range(n):
        grid = _grid(rng, 80, 12)
        t = rng.integers(0, types, len(grid))
        out.append((centres[t] + rng.normal(size=(len(grid), d)), grid))
    return out


def test_fit_is_seeded_and_label_free(rng):
    slides = _slides(rng)
    feats = [f for f, _ in slides]
    a = fit_prototypes(feats, k=4, seed=3)
    b = fit_prototypes(feats, k=4, seed=3)
    assert a.digest() == b.digest()
    va = [slide_vector(a, f, g, "cooc") for f, g in slides]
    vb = [slide_vector(b, f, g, "cooc") for f, g in slides]
    np.testing.assert_array_equal(np.stack(va), np.stack(vb))
    # the fit sees features only: a subsample cap makes it look at fewer tiles, seeded
    c = fit_prototypes(feats, k=4, seed=3, max_tiles=300)
    assert c.n_fit_tiles < sum(len(f) for f in feats)
    assert fit_prototypes(feats, k=4, seed=3, max_tiles=300).digest() == c.digest()


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_slide_vector_layout(rng, method):
    slides = _slides(rng, d=6)
    model = fit_prototypes([f for f, _ in slides], k=3, method=method, seed=0, radii=(1, 3))
    feats, grid = slides[0]
    d = model.proj.shape[1]
    p = slide_vector(model, feats, grid, "prototypes")
    c = slide_vector(model, feats, grid, "cooc")
    assert p.shape == (3 + 3 * d,) and c.shape == (3 + 3 * d + 2 * 6,)
    np.testing.assert_allclose(p, c[: len(p)])
    np.testing.assert_allclose(p[:3].sum(), 1.0, rtol=1e-6)  # proportions
    # proportion-weighted prototype means sum to the slide's mean whitened feature
    np.testing.assert_allclose(
        p[3:].reshape(3, d).sum(0), model.whiten(feats).mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(c[len(p) : len(p) + 6].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(c[len(p) + 6 :].sum(), 1.0, rtol=1e-6)


def test_cooc_sees_arrangement_that_proportions_miss():
    # two slides with identical composition: a and b interleaved vs in two halves
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2)
    mixed = (grid[:, 0] + grid[:, 1]) % 2
    split = (grid[:, 0] >= 5).astype(int)
    centres = np.array([[0.0, 0.0], [10.0, 10.0]])
    noise = np.random.default_rng(0).normal(size=(100, 2)) * 0.1
    fa, fb = centres[mixed] + noise, centres[split] + noise
    model = fit_prototypes([fa, fb], k=2, seed=0)
    pa, pb = (slide_vector(model, f, grid, "prototypes")[:2] for f in (fa, fb))
    np.testing.assert_allclose(pa, pb)
    ca, cb = (slide_vector(model, f, grid, "cooc") for f in (fa, fb))
    assert np.abs(ca[-6:] - cb[-6:]).max() > 0.2


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("prototypes", ("prototypes", 16, "kmeans")),
        ("cooc:8", ("cooc", 8, "kmeans")),
        ("cooc:6:gmm", ("cooc", 6, "gmm")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_prototype_spec(spec) == expected


@pytest.mark.parametrize("spec", ["cooc:x", "cooc:1", "cooc:4:dbscan", "proto", "cooc:4:gmm:1"])
def test_parse_spec_errors(spec):
    with pytest.raises(ValueError, match="cooc|prototypes|K|method"):
        parse_prototype_spec(spec)
