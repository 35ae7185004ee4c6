"""The comparison a pathology researcher reads first: markdown tables and plain verdicts.

From the rows of ``report.collect_results`` (one per method and task: the k-fold probe's
AUROC and, where ``--shots`` ran, the few-shot summary) and the ``retrieval.json`` rows:

- :func:`auroc_table`: methods x tasks, full-data AUROC fold mean ± std;
- :func:`fewshot_table`: methods x tasks, few-shot mean over K ± the mean std over draws and
  the K = 4 value, plus MVAcc@5 retrieval;
- :func:`verdicts`: does a method beat every baseline on full-data AUROC?
- :func:`random_init_verdicts`: does a pretrained encoder beat *its own random init* - on
  few-shot, retrieval and the full-data probe? The question pretraining has to answer.
"""

from __future__ import annotations

import math

__all__ = ["auroc_table", "cell", "fewshot_table", "num", "random_init_verdicts", "verdicts"]


def num(x) -> float:
    """``x`` as a float, None as nan."""
    return float("nan") if x is None else float(x)


def cell(mean, std) -> str:
    """``mean ± std`` with three decimals (``n/a`` without a mean)."""
    return "n/a" if mean is None else f"{num(mean):.3f} ± {num(std):.3f}"


def verdicts(rows: list[dict], focus) -> list[str]:
    """One plain sentence per task and focus method: does it beat every baseline on AUROC?

    ``focus`` is a method name or a list of them (e.g. several pretraining recipes); each
    is compared with the methods that are not in the list."""
    if not focus:
        return []
    focus = [focus] if isinstance(focus, str) else list(focus)
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for name in focus:
            out += _verdict(rows, task, name, focus)
    return out


def _verdict(rows: list[dict], task: str, focus: str, group: list[str]) -> list[str]:
    out: list[str] = []
    by = {r["method"]: r for r in rows if r["task"] == task and r["auroc_mean"] is not None}
    others = {m: r for m, r in by.items() if m not in group}
    if focus in by and others:
        me = by[focus]
        best_m, best = max(others.items(), key=lambda kv: kv[1]["auroc_mean"])
        diff = me["auroc_mean"] - best["auroc_mean"]
        spread = max(num(me["auroc_std"]), num(best["auroc_std"]))
        ci = me.get("auroc_ci") or [None, None]
        chance = ""
        if ci[0] is not None and ci[0] <= 0.5 <= ci[1]:
            chance = f" Its AUROC 95% CI [{ci[0]:.3f}, {ci[1]:.3f}] contains 0.5 (chance)."
        nums = (
            f"AUROC {me['auroc_mean']:.3f} ± {num(me['auroc_std']):.3f} vs best baseline "
            f"{best_m} {best['auroc_mean']:.3f} ± {num(best['auroc_std']):.3f} ({diff:+.3f})"
        )
        if diff > spread and not chance:
            out.append(
                f"`{task}`: **{focus} beats every baseline**: {nums}, by more than one "
                f"fold std ({spread:.3f})."
            )
        elif diff > 0:
            within = f", within one fold std ({spread:.3f})" if diff <= spread else ""
            out.append(
                f"`{task}`: **{focus} does not clearly beat the baselines**: "
                f"{nums}{within}.{chance}"
            )
        else:
            out.append(f"`{task}`: **{focus} does NOT beat the baselines**: {nums}.{chance}")
    return out


def _by(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["task"]): r for r in rows}


def _methods(rows: list[dict], order=None) -> list[str]:
    found = list(dict.fromkeys(r["method"] for r in rows))
    if not order:
        return found
    return [m for m in order if m in found] + [m for m in found if m not in order]


def auroc_table(rows: list[dict], tasks: list[str], order=None, labels=None) -> list[str]:
    """Markdown: one row per method, full-data AUROC fold mean ± std per task."""
    by, labels = _by(rows), labels or {}
    out = ["| method | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for m in _methods(rows, order):
        cells = [
            cell((by.get((m, t)) or {}).get("auroc_mean"), (by.get((m, t)) or {}).get("auroc_std"))
            for t in tasks
        ]
        out.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return out


def _mvacc(retrieval: list[dict], method: str, label: str, k: int = 5):
    for r in retrieval:
        if r.get("method") == method and r.get("label") == label:
            return r.get(f"mvacc@{k}")
    return None


def fewshot_table(
    rows: list[dict], retrieval: list[dict], tasks: list[str], mv_label: str | None,
    order=None, labels=None,
) -> list[str]:  # fmt: skip
    """Markdown: per method and task the few-shot mean over K ± mean std over draws, and
    K = 4; then MVAcc@5 on ``mv_label``."""
    by, labels = _by(rows), labels or {}
    head = [f"{t}: few-shot mean K={{{_shots(rows)}}} / K=4" for t in tasks]
    if mv_label:
        head.append(f"MVAcc@5 {mv_label}")
    out = ["| method | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for m in _methods(rows, order):
        cells = []
        for t in tasks:
            r = by.get((m, t)) or {}
            if r.get("fewshot_mean") is None:
                cells.append("n/a")
                continue
            cells.append(
                f"{num(r['fewshot_mean']):.3f} ± {num(r['fewshot_std']):.3f} / "
                f"{num(r['fewshot_k4']):.3f}"
            )
        if mv_label:
            v = _mvacc(retrieval, m, mv_label)
            cells.append("n/a" if v is None else f"{v:.3f}")
        out.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return out


def _shots(rows: list[dict]) -> str:
    for r in rows:
        if r.get("fewshot_shots"):
            return ",".join(str(k) for k in r["fewshot_shots"])
    return ""


def random_init_verdicts(
    rows: list[dict], retrieval: list[dict], recipes, baseline: str, tasks: list[str],
    mv_label: str | None,
) -> list[str]:  # fmt: skip
    """One plain line per pretrained recipe: its few-shot (mean over K), MVAcc@5 and
    full-data AUROC against the random init of the same architecture, and whether
    pretraining paid (better on few-shot by more than the draws' standard error on every
    task, no full-data loss above 0.01)."""
    by = _by(rows)
    out = []
    for m in [recipes] if isinstance(recipes, str) else recipes:
        parts, paid = [], True
        for t in tasks:
            a, b = by.get((m, t)) or {}, by.get((baseline, t)) or {}
            if a.get("fewshot_mean") is None or b.get("fewshot_mean") is None:
                continue
            d = a["fewshot_mean"] - b["fewshot_mean"]
            se = num(a.get("fewshot_sem"))
            paid &= d > (se if math.isfinite(se) else 0.0)
            full = num(a.get("auroc_mean")) - num(b.get("auroc_mean"))
            paid &= not full < -0.01
            parts.append(f"`{t}` few-shot {a['fewshot_mean']:.3f} vs {b['fewshot_mean']:.3f} "
                         f"({d:+.3f}), full probe {full:+.3f}")  # fmt: skip
        if mv_label:
            va, vb = _mvacc(retrieval, m, mv_label), _mvacc(retrieval, baseline, mv_label)
            if va is not None and vb is not None:
                parts.append(f"MVAcc@5 `{mv_label}` {va:.3f} vs {vb:.3f} ({va - vb:+.3f})")
                paid &= va >= vb
        if not parts:
            continue
        word = "pretraining pays" if paid else "pretraining does NOT pay"
        out.append(f"**{m}** vs its random init: {word} - " + "; ".join(parts) + ".")
    return out
