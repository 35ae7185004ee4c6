"""``slidessl diagnose``: why an encoder's slide embedding does (not) beat simple aggregation.

Three label-free or label-light checks on one cohort:

- **coordinate shuffle**: each slide's tile positions are permuted among its tiles (the
  features stay, the arrangement goes) and the slide is embedded again. ``shuffle_shift``
  is the mean cosine distance between a slide's embedding before and after, divided by the
  mean cosine distance between two different slides: 0 for anything that ignores
  arrangement (mean pooling exactly), clearly above 0 for an encoder that uses it.
- **slide-identity leakage**: two random windows of each slide (``crop_fraction`` of its
  tiles each) are embedded; each window's nearest other window (cosine) is from the same
  slide (``same_slide_top1``), and, among windows of *other patients*, has the same label
  (``same_label_top1``, per task). An embedding that recognises its slide from any window
  but not the label keys on slide identity (stain, scanner) rather than tissue.
- **per-layer probes**: the linear probe of the CLS and of the token mean after each block
  (block 0 = the input embedding), on the folds the other methods use: where along the
  depth the signal appears or is lost.

Example::

    slidessl diagnose runs/dinov2/teacher cohort/manifest.csv --task infiltrated --out diag
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "coordinate_shuffle",
    "diagnose_items",
    "format_diagnose",
    "identity_leakage",
    "layer_embeddings",
    "run_diagnose",
]


def _cos_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(-1)


def coordinate_shuffle(encoder, items: list[dict], pooling: str, seed: int = 0) -> dict:
    """``{"shuffle_shift", "self_distance", "between_distance"}`` (see the module doc)."""
    from slidessl.eval.embed import embed_items

    rng = np.random.default_rng(seed)
    shuffled = []
    for it in items:
        perm = torch.from_numpy(rng.permutation(len(it["grid"])))
        shuffled.append(dict(it, grid=it["grid"][perm]))
    ids, a = embed_items(encoder, items, pooling, batch_size=8)
    ids2, b = embed_items(encoder, shuffled, pooling, batch_size=8)
    order = [ids2.index(s) for s in ids]
    b = b[order]
    self_d = float(_cos_dist(a, b).mean())
    pairs = rng.integers(0, len(a), (min(4096, len(a) * 8), 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    between = float(_cos_dist(a[pairs[:, 0]], a[pairs[:, 1]]).mean()) if len(pairs) else 0.0
    return {
        "shuffle_shift": self_d / between if between > 0 else 0.0,
        "self_distance": self_d,
        "between_distance": between,
    }


def _window(grid: np.ndarray, count: int, rng) -> np.ndarray:
    centre = grid[rng.integers(len(grid))]
    dist = np.abs(grid - centre).max(axis=1) + rng.random(len(grid)) * 0.5
    return np.sort(np.argpartition(dist, count - 1)[:count])


def identity_leakage(
    encoder, items: list[dict], labels: dict, patients: dict, pooling: str,
    crop_fraction: float = 0.25, seed: int = 0,
) -> dict:  # fmt: skip
    """Nearest-window retrieval: ``same_slide_top1`` and ``same_label_top1[task]``.

    ``labels``: ``{task: {slide_id: label or None}}``; ``patients``: slide id -> patient.
    Windows are the ``crop_fraction`` of a slide's tiles nearest a random tile (two per
    slide), embedded as slides of their own."""
    from slidessl.eval.embed import embed_items

    rng = np.random.default_rng(seed)
    crops, owner = [], []
    for it in items:
        n = len(it["grid"])
        count = max(1, int(round(crop_fraction * n)))
        for j in range(2):
            rows = torch.from_numpy(_window(it["grid"].numpy(), count, rng))
            g = it["grid"][rows]
            crops.append(
                {"slide_id": f"{it['slide_id']}#{j}", "features": it["features"][rows],
                 "grid": g - g.min(dim=0).values}
            )  # fmt: skip
            owner.append(it["slide_id"])
    ids, vecs = embed_items(encoder, crops, pooling, batch_size=8)
    index = {c["slide_id"]: k for k, c in enumerate(crops)}
    owner = np.array([owner[index[i]] for i in ids])
    v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    same_slide = float(np.mean(owner[np.argmax(sim, axis=1)] == owner))
    out = {"same_slide_top1": same_slide, "same_label_top1": {}, "n_windows": len(ids)}
    pat = np.array([patients.get(s, s) for s in owner])
    for task, lab in labels.items():
        y = np.array([lab.get(s) for s in owner], dtype=object)
        hits = []
        for k in range(len(ids)):
            if y[k] is None:
                continue
            ok = (pat != pat[k]) & np.array([t is not None for t in y])
            if not ok.any():
                continue
            j = np.flatnonzero(ok)[np.argmax(sim[k, ok])]
            hits.append(y[j] == y[k])
        out["same_label_top1"][task] = float(np.mean(hits)) if hits else None
    return out


@torch.no_grad()
def layer_embeddings(encoder, items: list[dict]) -> dict[str, np.ndarray]:
    """``{"cls@L" / "mean@L": (n, E)}`` for L = 0 (input embedding) .. depth, each state
    through the final LayerNorm (as the pooled output), in the order of ``items``."""
    out: dict[str, list] = {}
    for it in items:
        states = encoder.forward_intermediates(
            it["features"][None].float(),
            it["grid"][None],
            include_input=True,
            intermediates_only=True,
        )
        for depth, h in enumerate(states):
            hn = encoder.norm(h)
            out.setdefault(f"cls@{depth}", []).append(hn[0, 0].numpy())
            out.setdefault(f"mean@{depth}", []).append(encoder.norm(h[0, 1:].mean(0)).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def diagnose_items(
    encoder, desc: str, items: list[dict], manifest, tasks, folds, pooling: str = "mean",
    k: int = 5, seed: int = 0,
) -> dict:  # fmt: skip
    """The three checks on preloaded slides (``tasks`` from ``data.tasks.build_tasks``,
    ``folds`` the folds file shared with the other methods). Survival tasks are left out:
    the per-layer probes and leakage checks read class labels."""
    from slidessl.eval.probe import run_probe

    tasks = [tk for tk in tasks if tk.kind != "survival"]
    result = {"encoder": desc, "pooling": pooling, "n_slides": len(items)}
    result["coordinate_shuffle"] = coordinate_shuffle(encoder, items, pooling, seed)
    labels = {
        tk.name: {s: int(y) for s, y in zip(tk.slide_ids, tk.y)}
        for tk in tasks
        if tk.kind == "binary"
    }
    patients = {e.slide_id: e.patient_id for e in manifest.entries}
    result["identity_leakage"] = identity_leakage(
        encoder, items, labels, patients, pooling, seed=seed
    )
    result["layers"] = {}
    if encoder is not None and hasattr(encoder, "forward_features"):
        ids = [it["slide_id"] for it in items]
        for name, X in layer_embeddings(encoder, items).items():
            res = run_probe(ids, X, tasks, Path(folds), k, seed, n_boot=200)
            result["layers"][name] = {
                tk.name: [s["auroc_mean"], s["auroc_std"]] for tk, s in zip(res[0], res[3])
            }
    return result


def run_diagnose(
    encoder_spec: str, manifest_path, task_specs, out, pooling: str = "mean",
    max_tiles: int = 4000, k: int = 5, seed: int = 0, folds=None,
) -> dict:  # fmt: skip
    """All three checks; writes ``OUT/diagnose.json`` and returns it."""
    from slidessl.data.dataset import SlideDataset
    from slidessl.data.manifest import load_manifest
    from slidessl.data.tasks import build_tasks
    from slidessl.eval.embed import build_embedder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(manifest_path)
    tasks = build_tasks(manifest, task_specs)
    ds = SlideDataset(manifest, max_tiles=max_tiles, seed=seed, on_bad_slide="skip")
    items = [it for it in (ds[i] for i in range(len(ds))) if it is not None]
    encoder, desc = build_embedder(encoder_spec, ds.feature_dim, seed)
    folds = Path(folds) if folds else out / "folds.json"
    result = diagnose_items(encoder, desc, items, manifest, tasks, folds, pooling, k, seed)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def format_diagnose(result: dict) -> str:
    """The printed summary of :func:`run_diagnose`."""
    cs, il = result["coordinate_shuffle"], result["identity_leakage"]
    lines = [
        f"encoder {result['encoder']} ({result['pooling']}), {result['n_slides']} slides",
        f"coordinate shuffle: embedding moves {cs['shuffle_shift']:.3f} of the between-slide "
        f"distance (0 = ignores arrangement)",
        f"identity leakage: nearest window from the same slide {il['same_slide_top1']:.3f}; "
        "same label among other patients: "
        + ", ".join(f"{t} {v:.3f}" for t, v in il["same_label_top1"].items() if v is not None),
    ]
    if result["layers"]:
        tasks = list(next(iter(result["layers"].values())))
        lines.append("per-layer probe AUROC: " + " | ".join(tasks))
        for name, row in result["layers"].items():
            lines.append(f"  {name:8s} " + "  ".join(f"{row[t][0]:.3f}" for t in tasks))
    return "\n".join(lines)
