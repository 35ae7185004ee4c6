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
    assert m["acc@1"] == pytest.approx(3 / 6)
    assert m["mvacc@1"] == pytest.approx(3 / 6)
    assert m["acc@3"] == pytest.approx(5 / 6)  # slide 4's top-3 are all "a"
    # AP@1 per query equals the top-1 hit
    assert m["map@1"] == pytest.approx(3 / 6)


def test_zero_vector_is_an_error():
    with pytest.raises(ValueError, match="all zeros"):
        cosine_neighbours(np.zeros((3, 2)), ["a", "b", "c"], 1)


def test_metrics_against_brute_force(rng):
    """Acc@K, MVAcc@K and mAP@K against a direct loop over queries (ties in the vote by
    summed similarity), patients with several slides, three labels."""
    n = 40
    X = rng.standard_normal((n, 6))
    labels = rng.choice(["a", "b", "c"], n)
    patients = rng.integers(0, 25, n).astype(str)
    got = retrieval_metrics(X, labels, patients, ks=(1, 3, 5))
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    for k in (1, 3, 5):
        acc, mv, aps = [], [], []
        for i in range(n):
            cand = [j for j in range(n) if patients[j] != patients[i]]
            ranked = sorted(cand, key=lambda j: (-(Z[i] @ Z[j]), j))[:k]
            hits = [labels[j] == labels[i] for j in ranked]
            acc.append(any(hits))
            tally = {}
            for j in ranked:
                c, s = tally.get(labels[j], (0, 0.0))
                tally[labels[j]] = (c + 1, s + Z[i] @ Z[j])
            mv.append(max(tally, key=lambda lab: tally[lab]) == labels[i])
            relevant = sum(labels[j] == labels[i] for j in cand)
            if relevant:
                prec = [sum(hits[: m + 1]) / (m + 1) for m in range(len(hits))]
                aps.append(sum(p * h for p, h in zip(prec, hits)) / min(k, relevant))
        assert got[f"acc@{k}"] == pytest.approx(np.mean(acc))
        assert got[f"mvacc@{k}"] == pytest.approx(np.mean(mv))
        assert got[f"map@{k}"] == pytest.approx(np.mean(aps))
