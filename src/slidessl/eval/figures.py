"""The figures of ``slidessl report``: ROC / PR curves, pretraining health, slide maps.

Each reads files only (``predictions.npz``, a run's ``metrics.csv``, stored ``*.maps.npz``)
and writes PNGs under the report's ``figures`` folder; nothing here runs a model.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def plot_curves(pred_files: dict[str, Path], fig_dir: Path) -> list[str]:
    """ROC and PR curves per task (binary, or micro-averaged one-vs-rest), all methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    preds = {m: np.load(p) for m, p in pred_files.items() if p.exists()}
    tasks = dict.fromkeys(k.split("/")[0] for d in preds.values() for k in d.files)
    written = []
    for task in tasks:
        fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
        for method, d in preds.items():
            if f"{task}/y" not in d.files or str(d[f"{task}/kind"]) == "survival":
                continue
            y, s, kind = d[f"{task}/y"], d[f"{task}/scores"], str(d[f"{task}/kind"])
            if kind == "multiclass":
                y = np.eye(s.shape[1])[y]
            y, s = np.asarray(y).ravel(), np.asarray(s).ravel()
            if y.min() == y.max():
                continue
            fpr, tpr, _ = roc_curve(y, s)
            prec, rec, _ = precision_recall_curve(y, s)
            ax_roc.plot(fpr, tpr, label=method)
            ax_pr.plot(rec, prec, label=method)
        if not ax_roc.lines:  # a survival task: Kaplan-Meier curves instead (plot_km)
            plt.close(fig)
            continue
        ax_roc.plot([0, 1], [0, 1], ":", color="grey")
        ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task}: ROC")
        ax_pr.set(xlabel="recall", ylabel="precision", title=f"{task}: PR (pooled out-of-fold)")
        ax_roc.legend(fontsize=8)
        written.append(save_figure(fig, fig_dir / f"curves_{task}.png", dpi=80))
    return written


def save_figure(fig, path: Path, dpi: int = 80) -> str:
    """Lay out, write and close ``fig``; returns the path as a string."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def _column(rows: list[dict], name: str) -> np.ndarray:
    return np.array(
        [float(r[name]) if r.get(name) not in (None, "", "nan") else np.nan for r in rows]
    )


def plot_training(csv_path: Path, fig_dir: Path, name: str = "") -> str | None:
    """The health of one pretraining run from its ``metrics.csv``: losses (with ``log K``),
    gradient norm / update-to-weight ratio / distance from the initial weights (log scale),
    the label-aware k-NN monitor against its step-0 (random init) value, the schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "step" not in rows[0]:
        return None
    cols = list(rows[0])
    step = _column(rows, "step")
    losses = [c for c in cols if c.endswith("loss")]
    if not losses:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    for c in losses:
        ax.plot(step, _column(rows, c), label=c)
    cfg_path = csv_path.parent / "config.yaml"
    if cfg_path.exists():
        import yaml

        k = (yaml.safe_load(cfg_path.read_text()) or {}).get("dino", {}).get("out_dim")
        if k:
            ax.axhline(math.log(k), color="grey", ls=":", label=f"log K (K={k})")
    ax.set(xlabel="step", title="pretraining losses")
    ax = axes[1]
    for c in ("grad_norm", "update_ratio", "weight_dist"):
        if c in cols:
            v = _column(rows, c)
            ax.plot(step[v > 0], v[v > 0], label=c)
    ax.set(xlabel="step", yscale="log", title="gradient norm, update / weight, distance from init")
    ax = axes[2]
    if "knn_auroc" in cols:
        v = _column(rows, "knn_auroc")
        ax.plot(step[np.isfinite(v)], v[np.isfinite(v)], "o-", label="teacher k-NN AUROC")
        init = _column(rows, "knn_auroc_init")
        if np.isfinite(init).any():
            ax.axhline(
                float(init[np.isfinite(init)][0]),
                color="grey",
                ls="--",
                label="step 0 (random init)",
            )
        ax.set(title="label-aware monitor (held-out)")
    else:
        ax.text(0.5, 0.5, "no label monitor\n(monitor.eval_manifest)", ha="center", va="center")
        ax.set(title="label-aware monitor")
    ax.set(xlabel="step")
    ax = axes[3]
    for c in ("lr", "teacher_temp", "momentum"):
        if c in cols:
            v = _column(rows, c)
            ax.plot(step, v / max(np.nanmax(np.abs(v)), 1e-12), label=c)
    ax.set(xlabel="step", title="schedules (each scaled to its max)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if name:
        fig.suptitle(f"pretraining: {name}")
    stem = "training_curves" + (f"_{name}" if name else "")
    return save_figure(fig, fig_dir / f"{stem}.png", dpi=80)


def slide_maps(run_dir: Path, fig_dir: Path) -> list[dict]:
    """PNGs of the slide maps stored under ``run_dir`` (``*.maps.npz``, written by
    ``slidessl embed --maps`` and ``slidessl demo`` while they ran the encoder): the report
    plots what was stored and runs no model."""
    from slidessl.eval.maps import read_maps, save_slide_map

    out = []
    for path in sorted(run_dir.rglob("*.maps.npz")):
        stem = path.name[: -len(".maps.npz")]
        for data in read_maps(path):
            safe = data["slide_id"].replace("/", "_")
            png = fig_dir / f"map_{stem}_{safe}.png"
            out.append({"method": stem, **save_slide_map(data, png, f"{stem}: {data['slide_id']}")})
    return out
