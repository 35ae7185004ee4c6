"""Turn out-of-fold predictions into the numbers every method reports, and write them.

Shared by the linear probe and ABMIL so both report the same statistics on the same folds:
per-fold AUROC / AUPRC (mean +- std over folds, folds lacking a class are skipped and
counted), a percentile-bootstrap 95% CI on the pooled out-of-fold predictions, and for
multi-label tasks the macro and micro averages; survival tasks get per-patient C-indices
instead (``eval.survival``).

Files: ``DIR/metrics.json`` (``{"method", "tasks": {name: {...}}}``) and
``DIR/predictions.npz`` (``<task>/slide_ids``, ``<task>/patient_ids``, ``<task>/y``,
``<task>/scores``, ``<task>/fold``, ``<task>/kind``) from which ``slidessl report`` draws
ROC and PR curves, and Kaplan-Meier curves of survival tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slidessl.data.tasks import Task
from slidessl.eval.metrics import bootstrap_ci, task_metrics
from slidessl.eval.survival import summarize_survival


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarize(
    task: Task, fold: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Statistics of one task from its out-of-fold ``scores`` (binary and survival (n,),
    else (n, C)); survival tasks get C-indices (``eval.survival.summarize_survival``)."""
    if task.kind == "survival":
        return summarize_survival(task, fold, scores, n_boot=n_boot, seed=seed)
    per_fold = []
    for f in range(int(fold.max()) + 1):
        sel = fold == f
        if not sel.any():
            continue
        m = task_metrics(task.kind, task.y[sel], scores[sel])
        row = {"fold": f, "n_test": int(sel.sum()), "auroc": m["auroc"], "auprc": m["auprc"]}
        if task.kind == "multilabel":
            row["auroc_micro"], row["auprc_micro"] = m["auroc_micro"], m["auprc_micro"]
        per_fold.append(row)
    out = {
        "kind": task.kind,
        "columns": task.columns,
        "classes": task.classes,
        "n_slides": len(task.slide_ids),
        "n_patients": len(set(task.patient_ids)),
        "n_missing_labels": task.n_missing,
        "k": int(fold.max()) + 1,
    }
    keys = ["auroc", "auprc"]
    if task.kind == "multilabel":
        keys += ["auroc_micro", "auprc_micro"]
    for key in keys:
        mean, std, n_ok = _mean_std([r[key] for r in per_fold])
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
        if key == "auroc":
            out["n_folds_scored"] = n_ok
    pooled = task_metrics(task.kind, task.y, scores)
    out["auroc_pooled"], out["auprc_pooled"] = pooled["auroc"], pooled["auprc"]
    if "per_class" in pooled:
        out["per_class_pooled"] = pooled["per_class"]
    out.update(bootstrap_ci(task.kind, task.y, scores, n_boot=n_boot, seed=seed))
    out["per_fold"] = per_fold
    out.update(task.meta)
    return out


def _clean(obj):
    """JSON-safe copy: nan -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(
    out_dir: str | Path,
    method: str,
    tasks: list[Task],
    folds: list[np.ndarray],
    scores: list[np.ndarray],
    summaries: list[dict],
    extra: dict | None = None,
) -> Path:
    """Write ``metrics.json`` and ``predictions.npz`` to ``out_dir``; returns the json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"method": method, **(extra or {})}
    doc["tasks"] = {t.name: s for t, s in zip(tasks, summaries)}
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_clean(doc), indent=1))
    arrays = {}
    for t, f, s in zip(tasks, folds, scores):
        arrays[f"{t.name}/slide_ids"] = np.asarray(t.slide_ids, dtype=str)
        arrays[f"{t.name}/y"] = t.y
        arrays[f"{t.name}/scores"] = s
        arrays[f"{t.name}/fold"] = f
        arrays[f"{t.name}/kind"] = np.asarray(t.kind)
        arrays[f"{t.name}/patient_ids"] = np.asarray(t.patient_ids, dtype=str)
    np.savez(out_dir / "predictions.npz", **arrays)
    return path


def format_table(method: str, summaries: dict[str, dict]) -> str:
    """Plain-text table: AUROC / AUPRC fold mean +- std, and pooled value [bootstrap 95% CI]."""
    lines = [
        f"{'method':<14} {'task':<16} {'n':>5}  {'AUROC mean+-std':<15} {'pooled [95% CI]':<22}"
        f" {'AUPRC mean+-std':<15} {'pooled [95% CI]':<22}",
    ]
    for name, s in summaries.items():
        if s.get("kind") == "survival":
            lo, hi = s.get("cindex_ci") or [float("nan")] * 2
            split = s.get("median_split") or {}
            lines.append(
                f"{method:<14} {name:<16} {s['n_slides']:>5}  C-index {_f(s['cindex_mean'])}"
                f"+-{_f(s['cindex_std'])} pooled {_f(s['cindex_pooled'])} [{_f(lo)},{_f(hi)}]"
                f"  Uno {_f(s['uno_cindex'])} (tau {s['uno_tau']:.1f})"
                f"  log-rank p {_p(split.get('logrank_p'))}"
            )
            continue
        cells = []
        for key in ("auroc", "auprc"):
            lo, hi = s.get(f"{key}_ci") or [float("nan")] * 2
            cells.append(f"{_f(s[f'{key}_mean'])}+-{_f(s[f'{key}_std'])}")
            cells.append(f"{_f(s[f'{key}_pooled'])} [{_f(lo)},{_f(hi)}]")
        lines.append(
            f"{method:<14} {name:<16} {s['n_slides']:>5}  {cells[0]:<15} {cells[1]:<22}"
            f" {cells[2]:<15} {cells[3]:<22}"
        )
        if s.get("kind") == "multilabel":
            micro = f"{_f(s['auroc_micro_mean'])}+-{_f(s['auroc_micro_std'])}"
            micro_p = f"{_f(s['auprc_micro_mean'])}+-{_f(s['auprc_micro_std'])}"
            lines.append(f"{'':<14} {'  (micro)':<16} {'':>5}  {micro:<15} {'':<22} {micro_p:<15}")
    return "\n".join(lines)


def _p(x) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.2g}"


def _f(x) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"
