"""``slidessl report RUN_DIR``: one page that says how the methods compare, with spread.

Reads every ``metrics.json`` (probe / ABMIL) and ``retrieval.json`` under RUN_DIR, the
pretraining run's ``metrics.csv`` when there is one, the slide maps stored beside embeddings
(``*.maps.npz``) and ``RUN_DIR/run.json`` (written by ``slidessl demo``: the method to judge)
for the verdict. It runs no model.
Writes ``report.md``, ``report.json`` (``{"results": [{"method", "task", "auroc_mean",
"auroc_std", "auprc_mean", "auprc_std", ...}], ...}``; survival rows carry ``cindex_mean``,
``cindex_std``, ``cindex_ci`` instead) and PNGs under ``RUN_DIR/figures`` (Kaplan-Meier
curves of survival tasks from ``eval.survival_report``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slidessl.eval.figures import plot_curves, plot_training, slide_maps
from slidessl.eval.survival_report import (
    cindex_table,
    plot_km,
    survival_row,
    survival_verdicts,
)
from slidessl.eval.tables import (
    auroc_table,
    cell,
    fewshot_table,
    num,
    random_init_verdicts,
    verdicts,
)

RESULT_KEYS = (
    "kind",
    "auroc_mean",
    "auroc_std",
    "auprc_mean",
    "auprc_std",
    "auroc_ci",
    "auprc_ci",
    "n_slides",
    "k",
    "auroc_pooled",
    "auprc_pooled",
)


def fewshot_summary(fs: dict | None) -> dict:
    """The few-shot numbers of one task's ``metrics.json`` entry: mean over K of the
    per-K means (``fewshot_mean``), of the per-K std over draws (``fewshot_std``), the
    standard error of the per-draw mean over K (``fewshot_sem``), the K = 4 mean and std."""
    if not fs:
        return {}
    shots = sorted(int(k) for k in fs if k.isdigit())
    if not shots:
        return {}
    per_draw = np.nanmean(np.array([fs[str(k)]["scores"] for k in shots], dtype=float), axis=0)
    k4 = fs.get("4") or {}
    return {
        "fewshot_shots": shots,
        "fewshot_mean": fs.get("mean_over_k"),
        "fewshot_std": float(np.mean([num(fs[str(k)]["std"]) for k in shots])),
        "fewshot_sem": float(np.nanstd(per_draw, ddof=1) / np.sqrt(max(len(per_draw), 1))),
        "fewshot_k4": k4.get("mean"),
        "fewshot_k4_std": k4.get("std"),
    }


def collect_results(run_dir: Path) -> tuple[list[dict], dict[str, Path]]:
    rows, pred_files = [], {}
    for path in sorted(run_dir.rglob("metrics.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if "tasks" not in doc or "method" not in doc:
            continue
        method = doc["method"]
        pred_files[method] = path.parent / "predictions.npz"
        for task, s in doc["tasks"].items():
            row = {"method": method, "task": task, **{k: s.get(k) for k in RESULT_KEYS}}
            row.update(fewshot_summary(s.get("fewshot")))
            if s.get("kind") == "survival":
                row.update(survival_row(s))
            if s.get("kind") == "multilabel":
                row["auroc_micro_mean"] = s.get("auroc_micro_mean")
                row["auprc_micro_mean"] = s.get("auprc_micro_mean")
            rows.append(row)
    return rows, pred_files


def _diagnose_section(diagnoses: list[dict]) -> list[str]:
    """`slidessl diagnose` results as markdown: shuffle, identity leakage, best layer."""
    tasks = sorted({t for d in diagnoses for t in d["identity_leakage"]["same_label_top1"]})
    md = [
        "## Diagnostics (`slidessl diagnose`)",
        "",
        "Coordinate shuffle: how far a slide's embedding moves when its tiles' positions are "
        "permuted, relative to the distance between slides (0 = arrangement ignored). "
        "Identity leakage: a window's nearest other window is from the same slide, or "
        "(among other patients) has the same label. Best layer: the block whose CLS or "
        "token mean probes best.",
        "",
        "| method | shuffle shift | same slide top-1 | "
        + " | ".join(f"same {t} top-1" for t in tasks)
        + " | best layer (AUROC) per task |",
        "| --- | --- | --- | " + "--- | " * len(tasks) + "--- |",
    ]
    for d in diagnoses:
        il = d["identity_leakage"]
        same = [il["same_label_top1"].get(t) for t in tasks]
        best = []
        for t in d["layers"] and next(iter(d["layers"].values())) or []:
            name, row = max(d["layers"].items(), key=lambda kv: num(kv[1][t][0]))
            best.append(f"{t}: {name} ({num(row[t][0]):.3f})")
        md.append(
            f"| {d.get('method', d['encoder'])} | {d['coordinate_shuffle']['shuffle_shift']:.3f} "
            f"| {il['same_slide_top1']:.3f} | "
            + " | ".join("n/a" if v is None else f"{v:.3f}" for v in same)
            + f" | {'; '.join(best) or 'n/a'} |"
        )
    return [*md, ""]


def _summary(rows: list[dict], retrieval: list[dict], meta: dict):
    """The demo's two markdown tables (full-data AUROC; few-shot + MVAcc@5) and the verdict
    of each pretrained recipe against its random init (``run.json`` names them)."""
    focus = meta.get("focus") or []
    focus = [focus] if isinstance(focus, str) else list(focus)
    base = meta.get("random_init")
    order = [*focus, *([base] if base else []), "random-init-pca", "meanpool", "abmil"]
    labels = {m: f"`{m}` (pretrained)" for m in focus} | dict(meta.get("labels") or {})
    if base:
        labels[base] = f"{base} (same architecture)"
    tasks = meta.get("tasks") or list(
        dict.fromkeys(r["task"] for r in rows if r.get("kind") != "survival")
    )
    labelled = [r for r in rows if r.get("kind") != "survival"]  # survival: its own table
    tables = [
        "AUROC with all labels (fold mean ± std):",
        "",
        *auroc_table(labelled, tasks, order, labels),
    ]
    few = meta.get("fewshot_tasks") or []
    mv = meta.get("retrieval_label")
    if few and any(r.get("fewshot_mean") is not None for r in rows):
        tables += [
            "",
            "Few-shot (AUROC; K labelled patients per class, mean over K ± mean std over the "
            "draws / K = 4) and MVAcc@5 retrieval:",
            "",
            *fewshot_table(labelled, retrieval, few, mv, order, labels),
        ]
    surv = cindex_table(rows, [meta.get("ceiling"), *order], labels)
    if surv:
        tables += [
            "",
            "Survival (per patient; Harrell's C-index of the out-of-fold risk, pooled with a "
            "bootstrap 95% CI over patients; Uno's C truncated at tau months):",
            "",
            *surv,
        ]
    verdict = random_init_verdicts(rows, retrieval, focus, base, few, mv) if base else []
    return (tables if len(tables) > 3 else []), verdict


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | task | n | AUROC fold mean ± std | AUROC pooled [95% CI] "
        "| AUPRC fold mean ± std | AUPRC pooled [95% CI] |",
        "| --- | --- | ---: | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], -num(r["auroc_mean"]))):
        if r.get("kind") == "survival":
            continue
        cells = []
        for key in ("auroc", "auprc"):
            lo, hi = r.get(f"{key}_ci") or [None, None]
            cells.append(cell(r[f"{key}_mean"], r[f"{key}_std"]))
            cells.append(f"{num(r.get(f'{key}_pooled')):.3f} [{num(lo):.3f}, {num(hi):.3f}]")
        lines.append(
            f"| {r['method']} | {r['task']} | {r['n_slides']} | " + " | ".join(cells) + " |"
        )
    return lines


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def make_report(run_dir):
    """Write ``report.md`` / ``report.json`` / figures for ``run_dir``; returns report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    rows, pred_files = collect_results(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: no metrics.json from `slidessl probe` or `abmil` inside")
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    curves = plot_curves(pred_files, fig_dir)
    curves += plot_km(pred_files, fig_dir, [meta.get("ceiling"), *(meta.get("focus") or [])])
    csvs = sorted(run_dir.rglob("metrics.csv"))
    training = [
        p
        for p in (plot_training(c, fig_dir, c.parent.name if len(csvs) > 1 else "") for c in csvs)
        if p
    ]
    maps = slide_maps(run_dir, fig_dir)
    retrieval = [json.loads(p.read_text()) for p in sorted(run_dir.rglob("retrieval.json"))]
    diagnoses = [json.loads(p.read_text()) for p in sorted(run_dir.rglob("diagnose.json"))]
    focus = meta.get("focus")
    verdict = verdicts(rows, focus)
    tables, init_verdict = _summary(rows, retrieval, meta)
    md = [f"# slidessl evaluation report: `{run_dir}`", ""]
    if meta.get("description"):
        md += [meta["description"], ""]
    if tables:
        md += ["## Summary", "", *tables, ""]
    if init_verdict:
        md += ["## Does pretraining beat its own random init?", ""]
        md += [f"- {v}" for v in init_verdict] + [""]
    md += [
        "## Comparison (same patient-grouped folds for every method)",
        "",
        "Fold mean ± std: the metric in each test fold; pooled: the metric of all out-of-fold "
        "predictions together, with a percentile bootstrap 95% CI over slides (multi-class / "
        "multi-label: macro averages).",
        "",
        *_table(rows),
        "",
    ]
    surv_table, surv_verdict = cindex_table(rows), survival_verdicts(rows)
    if surv_table:
        md += [
            "## Survival (same folds; per patient)",
            "",
            "A patient's risk is the mean out-of-fold risk of its slides. Harrell's C-index "
            "in each test fold (mean ± std) and pooled over all folds with a percentile "
            "bootstrap 95% CI over patients; Uno's IPCW C truncated at tau (the 80th "
            "percentile of follow-up); log-rank test of the patients above vs at or below "
            "the median pooled risk (Kaplan-Meier figures below).",
            "",
            *surv_table,
            "",
            *[f"- {v}" for v in surv_verdict],
            "",
        ]
    if verdict:
        names = ", ".join(f"`{f}`" for f in ([focus] if isinstance(focus, str) else focus))
        md += [f"## Does {names} beat the baselines?", "", *[f"- {v}" for v in verdict], ""]
    if retrieval:
        md += [
            "## Leave-one-patient-out retrieval (cosine)",
            "",
            "| method | label | Acc@1 | Acc@3 | Acc@5 | MVAcc@5 | mAP@5 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in retrieval:
            md.append(
                f"| {r['method']} | {r['label']} | {r['acc@1']:.3f} | "
                f"{r['acc@3']:.3f} | {r['acc@5']:.3f} | {r['mvacc@5']:.3f} | "
                f"{num(r['map@5']):.3f} |"
            )
        md.append("")
    if diagnoses:
        md += _diagnose_section(diagnoses)
    figs = [*curves, *training, *[m["path"] for m in maps]]
    if figs:
        md += ["## Figures", ""]
        md += [f"![{Path(f).stem}](figures/{Path(f).name})" for f in figs]
        md.append("")
    if meta.get("timings"):
        md += [
            "## Timings (s)",
            "",
            ", ".join(f"{k} {v:.1f}" for k, v in meta["timings"].items()),
            "",
        ]
    report = {
        "run_dir": str(run_dir),
        "results": rows,
        "verdict": verdict,
        "tables": tables,
        "random_init_verdict": init_verdict,
        "survival_verdict": surv_verdict,
        "retrieval": retrieval,
        "diagnose": diagnoses,
        "figures": figs,
        "slide_maps": maps,
        "meta": meta,
    }
    (run_dir / "report.json").write_text(json.dumps(_clean(report), indent=1))
    path = run_dir / "report.md"
    path.write_text("\n".join(md))
    return path
