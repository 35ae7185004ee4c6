import numpy as np
import pytest

from slidessl.eval.retrieval import cosine_neighbours, retrieval_metrics


def test_never_returns_the_query_patient(rng):
    n = 60
    patients = rng.integers(0, 15, n).astype(str)
    X = rng.standard_normal((n, 8))
    X[1::2] = X[::2] + 1e-3  # near-duplicates, often of the same patient
    idx, _ = cosine_neighbours(X, patients, k=n)
    for i in range(n):
        got = idx[i][idx[i] >= 0]
        assert i not in got
        assert not np.any(patients[got] == patients[i])
        assert len(got) == np.sum(patients != patients[i])


def test_metrics_on_a_hand_built_case():
    # two clusters; slide 4 (label b) sits in the "a" cluster
    X = np.array([[1, 0.0], [1, 0.1], [1, -0.1], [0, 1], [1, 0.05], [0.1, 1]])
    labels = ["a", "a", "a", "b", "b", "b"]
    patients = ["p0", "p1", "p2", "p3", "p4", "p5"]
    m = retrieval_metrics(X, labels, patients, ks=(1, 3))
    # nearest other-patient neighbours: 0->4(b) miss, 1->4 miss, 2->0 hit, 3->5 hit,
    # 4->0 miss, 5->3 hit
    assert m["top1_acc"] == pytest.approx(3 / 6)
    assert m["majority1_acc"] == pytest.approx(3 / 6)
    assert m["top3_acc"] == pytest.approx(5 / 6)  # slide 4's top-3 are all "a"
    # AP@1 per query equals the top-1 hit
    assert m["map@1"] == pytest.approx(3 / 6)


def test_zero_vector_is_an_error():
    with pytest.raises(ValueError, match="all zeros"):
        cosine_neighbours(np.zeros((3, 2)), ["a", "b", "c"], 1)
