"""The survival part of ``slidessl report``: a C-index table and Kaplan-Meier figures.

From the rows of ``report.collect_results`` whose ``kind`` is ``survival`` (one per method
and task, per patient: Harrell's C-index fold mean ± std, pooled with its bootstrap 95% CI,
Uno's C, the median split's log-rank p) and the ``predictions.npz`` of each method
(pooled out-of-fold risk per slide, time and event, patient ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slidessl.eval.figures import save_figure
from slidessl.eval.survival import kaplan_meier, median_split, per_patient
from slidessl.eval.tables import cell, num

SURVIVAL_KEYS = (
    "cindex_mean",
    "cindex_std",
    "cindex_pooled",
    "cindex_ci",
    "uno_cindex",
    "uno_tau",
    "n_patients",
    "n_events",
)


def survival_row(summary: dict) -> dict:
    """The report row's survival fields of one task's ``metrics.json`` entry."""
    row = {k: summary.get(k) for k in SURVIVAL_KEYS}
    row["logrank_p"] = (summary.get("median_split") or {}).get("logrank_p")
    return row


def _ci(r: dict) -> str:
    lo, hi = r.get("cindex_ci") or [None, None]
    return f"{num(r.get('cindex_pooled')):.3f} [{num(lo):.3f}, {num(hi):.3f}]"


def _p(x) -> str:
    x = num(x)
    return "n/a" if not np.isfinite(x) else f"{x:.2g}"


def cindex_table(rows: list[dict], order=None, labels=None) -> list[str]:
    """Markdown: per method and survival task, Harrell's C (fold mean ± std, pooled [95% CI]),
    Uno's C and the log-rank p of the median split; best pooled C first within a task."""
    labels = labels or {}
    surv = [r for r in rows if r.get("kind") == "survival"]
    rank = {m: i for i, m in enumerate(order or [])}
    out = [
        "| method | task | patients (events) | C-index fold mean ± std | C-index pooled "
        "[95% CI] | Uno's C (tau) | log-rank p, median split |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(surv, key=lambda r: (r["task"], -num(r.get("cindex_pooled")),
                                         rank.get(r["method"], len(rank)))):  # fmt: skip
        tau = num(r.get("uno_tau"))
        out.append(
            f"| {labels.get(r['method'], r['method'])} | {r['task']} | {r.get('n_patients')} "
            f"({r.get('n_events')}) | {cell(r.get('cindex_mean'), r.get('cindex_std'))} | "
            f"{_ci(r)} | {num(r.get('uno_cindex')):.3f} ({tau:.0f}) | {_p(r.get('logrank_p'))} |"
        )
    return out if len(out) > 2 else []


def survival_verdicts(rows: list[dict], baseline: str = "meanpool") -> list[str]:
    """Per survival task and method: pooled C against ``baseline``'s, and whether the gap
    exceeds the width of the method's bootstrap 95% CI."""
    surv = [r for r in rows if r.get("kind") == "survival"]
    out = []
    for task in dict.fromkeys(r["task"] for r in surv):
        by = {r["method"]: r for r in surv if r["task"] == task}
        if baseline not in by:
            continue
        b = num(by[baseline].get("cindex_pooled"))
        for m, r in by.items():
            if m == baseline:
                continue
            lo, hi = r.get("cindex_ci") or [None, None]
            width = num(hi) - num(lo)
            c = num(r.get("cindex_pooled"))
            d = c - b
            if d > width:
                word = f"above {baseline} by more than its CI width ({width:.3f})"
            elif d < -width:
                word = f"below {baseline} by more than its CI width ({width:.3f})"
            else:
                word = f"within its CI width ({width:.3f}) of {baseline}"
            out.append(f"`{task}`: {m} C-index {c:.3f} vs {baseline} {b:.3f} ({d:+.3f}): {word}")
    return out


def _at_risk(time: np.ndarray, ticks: np.ndarray) -> list[int]:
    return [int((time >= t).sum()) for t in ticks]


def plot_km(pred_files: dict[str, Path], fig_dir: Path, order=None) -> list[str]:
    """One figure per survival task: a panel per method with the Kaplan-Meier curves of the
    patients above (high risk) and at or below (low risk) the median pooled out-of-fold
    risk, group sizes and events in the legend, the log-rank p in the title and the numbers
    at risk under the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = {m: np.load(p) for m, p in pred_files.items() if p.exists()}
    tasks: dict[str, list[str]] = {}
    for m, d in preds.items():
        for key in d.files:
            if key.endswith("/kind") and str(d[key]) == "survival":
                tasks.setdefault(key.split("/")[0], []).append(m)
    written = []
    rank = {m: i for i, m in enumerate(order or [])}
    for task, methods in tasks.items():
        methods = sorted(methods, key=lambda m: rank.get(m, len(rank)))
        cols = min(4, len(methods))
        rows_n = -(-len(methods) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.3 * cols, 4.4 * rows_n), squeeze=False)
        # the x axis ends at the 95th percentile of follow-up (a long sparse tail otherwise)
        times = np.concatenate([preds[m][f"{task}/y"][:, 0] for m in methods])
        t_max = float(np.quantile(times, 0.95))
        step = 12.0 * max(1, int(np.ceil(t_max / 12 / 6)))  # every 1, 2, ... years
        ticks = np.arange(0.0, t_max + 1e-9, step)
        for ax, m in zip(axes.ravel(), methods):
            d = preds[m]
            _, t, e, r = per_patient(d[f"{task}/patient_ids"], d[f"{task}/y"], d[f"{task}/scores"])
            split = median_split(t, e, r)
            high = r > split["threshold"]
            groups = ((~high, "low", "tab:blue"), (high, "high", "tab:red"))
            for sel, name, color in groups:
                x, s = kaplan_meier(t[sel], e[sel])
                label = f"{name} risk: n={int(sel.sum())}, {int(e[sel].sum())} events"
                ax.step(x, s, where="post", color=color, label=label)
            ax.set(xlim=(0, t_max), ylim=(0, 1.02), xticks=ticks)
            ax.set(xlabel="time (months)", ylabel="survival probability")
            ax.set_title(f"{m}: log-rank p = {_p(split['logrank_p'])}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
            # numbers at risk under each tick (x in data units, y in axes units)
            tr = ax.get_xaxis_transform()
            for row, (sel, name, color) in enumerate(groups):
                y = -0.30 - 0.07 * row
                ax.text(-0.08 * t_max, y, name, transform=tr, fontsize=7, ha="right",
                        va="top", color=color)  # fmt: skip
                for tick, n in zip(ticks, _at_risk(t[sel], ticks)):
                    ax.text(tick, y, str(n), transform=tr, fontsize=7, ha="center",
                            va="top", color=color)  # fmt: skip
            ax.text(-0.08 * t_max, -0.23, "at risk", transform=tr, fontsize=7, ha="right",
                    va="top")  # fmt: skip
        for ax in axes.ravel()[len(methods) :]:
            ax.axis("off")
        fig.suptitle(
            f"{task}: Kaplan-Meier per patient, pooled out-of-fold risk split at its median",
            fontsize=10,
        )
        written.append(save_figure(fig, fig_dir / f"km_{task}.png", dpi=90))
    return written
