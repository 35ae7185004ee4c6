"""Leave-one-patient-out slide retrieval by cosine similarity of slide embeddings.

Each slide queries all slides of **other** patients (its own patient's slides, itself
included, are never candidates: they would leak the label). With the ranked neighbours,
under TITAN's names (Ding et al., 2024, slide retrieval):

- ``acc@{k}`` (Acc@K): a query counts when at least one of its k nearest neighbours shares
  its label (the "top-k accuracy" of Yottixel / RetCCL style search papers);
- ``mvacc@{k}`` (MVAcc@K): the majority label of the k nearest neighbours equals the
  query's (ties broken by the summed similarity of the tied labels);
- ``map@{k}``: mean over queries of AP@k = (1 / min(k, R)) * sum_{i<=k} P@i * rel_i, R the
  number of relevant candidates of the query (queries with R = 0 are left out).
"""

from __future__ import annotations

import numpy as np


def cosine_neighbours(X: np.ndarray, patients, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) and similarities (n, k) of each slide's k nearest other-patient slides.

    Candidates of the query's own patient get -inf similarity; where fewer than k candidates
    exist the tail holds index -1.
    """
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a slide embedding is all zeros: cosine similarity is undefined")
    Z = X / norms
    sim = Z @ Z.T
    pat = np.asarray(patients)
    same = pat[:, None] == pat[None, :]
    sim[same] = -np.inf
    k_eff = min(k, len(X))
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k_eff]
    top = np.take_along_axis(sim, idx, axis=1)
    idx = np.where(np.isfinite(top), idx, -1)
    return idx, top


def retrieval_metrics(X: np.ndarray, labels, patients, ks=(1, 3, 5)) -> dict:
    """Leave-one-patient-out retrieval scores (see module docstring) for each k in ``ks``."""
    labels = np.asarray(labels)
    n = len(labels)
    if len(X) != n or len(patients) != n:
        raise ValueError(f"{len(X)} embeddings, {n} labels, {len(patients)} patient ids")
    kmax = max(ks)
    idx, sim = cosine_neighbours(X, patients, kmax)
    valid = idx >= 0
    nb_label = np.where(valid, labels[np.maximum(idx, 0)], None)
    rel = valid & (nb_label == labels[:, None])
    pat = np.asarray(patients)
    n_relevant = np.array([int(np.sum((labels == labels[i]) & (pat != pat[i]))) for i in range(n)])
    out = {"n_queries": n, "n_patients": len(set(patients))}
    for k in ks:
        r = rel[:, :k]
        out[f"acc@{k}"] = float(r.any(axis=1).mean())
        votes = []
        for i in range(n):
            tally: dict = {}
            for j in range(min(k, idx.shape[1])):
                if valid[i, j]:
                    lab = nb_label[i, j]
                    cnt, s = tally.get(lab, (0, 0.0))
                    tally[lab] = (cnt + 1, s + sim[i, j])
            best = max(tally.items(), key=lambda t: t[1])[0] if tally else None
            votes.append(best == labels[i])
        out[f"mvacc@{k}"] = float(np.mean(votes))
        prec = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
        denom = np.minimum(k, n_relevant)
        has = denom > 0
        ap = (prec * r).sum(axis=1)[has] / denom[has]
        out[f"map@{k}"] = float(ap.mean()) if has.any() else float("nan")
    return out


def run_retrieval(embeddings, manifest, label: str, out_dir, method: str = "") -> dict:
    """Retrieval of ``(ids, X, attrs)`` embeddings on one manifest ``label`` column; writes
    ``out_dir/retrieval.json``."""
    import json
    from pathlib import Path

    ids, X, _ = embeddings
    if label not in manifest.label_columns:
        raise ValueError(f"{manifest.source}: no label column {label!r}")
    index = {s: i for i, s in enumerate(ids)}
    rows = [e for e in manifest.entries if e.labels.get(label, "").strip() and e.slide_id in index]
    if len(rows) < 2:
        raise ValueError(f"{manifest.source}: fewer than 2 slides with {label!r} and an embedding")
    res = retrieval_metrics(
        X[[index[e.slide_id] for e in rows]],
        [e.labels[label].strip() for e in rows],
        [e.patient_id for e in rows],
    )
    res = {"method": method, "label": label, **res}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(res, indent=1))
    return res
