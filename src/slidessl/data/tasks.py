"""Tasks: which manifest label columns to predict, and how their raw strings become targets.

A task spec is ``COL`` (one column) or ``[NAME=]COL1+COL2+...`` (a multi-label task over
binary columns, e.g. ``mutations=EGFR+FAT1+KRAS+LRP1B+TP53``). Several specs are separated
by commas: ``--task tumor_high,infiltrated,subtype,mutations=EGFR+FAT1+KRAS+LRP1B+TP53``.
``NAME=surv:TIME_COL:EVENT_COL`` is a **survival** task (e.g. ``os=surv:os_months:os_event``):
a non-negative follow-up time and an event indicator (1 = death / progression, 0 =
censored). A slide with neither column is unlabelled (left out); one with only one of them,
a negative or non-numeric time, an event other than 0/1, or a patient whose slides disagree
on time or event is an error naming the manifest row.

One column with two distinct values is **binary** (positive class: ``1``/``true``/``yes``/
``pos``/``positive``/``mutated``/``mut`` when present, otherwise the second value in sorted
order); with more values it is **multi-class** (classes in sorted order); a column whose
values hold ``;``-separated names is **multi-label** over those names. Empty strings are
missing: a slide missing any of a task's columns is left out of that task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_POSITIVE = ("1", "1.0", "true", "yes", "pos", "positive", "mutated", "mut")
_NEGATIVE = ("0", "0.0", "false", "no", "neg", "negative", "wt", "wildtype", "wild-type")


@dataclass
class Task:
    """Targets of one task for the slides that have its labels.

    ``y`` is (n,) int for binary (0/1) and multi-class (class index), (n, L) int 0/1
    for multi-label, (n, 2) float64 ``[time, event]`` for survival. ``classes`` names the
    classes (binary: ``[negative, positive]``), the labels (multi-label) or, for survival,
    ``["censored", "event"]``; ``columns`` is ``[TIME_COL, EVENT_COL]`` for survival.
    """

    name: str
    kind: str
    columns: list[str]
    classes: list[str]
    slide_ids: list[str]
    patient_ids: list[str]
    y: np.ndarray
    n_missing: int = 0
    meta: dict = field(default_factory=dict)

    def subset(self, keep: np.ndarray) -> Task:
        """The same task restricted to the boolean / index selection ``keep``."""
        idx = np.arange(len(self.slide_ids))[keep]
        return Task(
            self.name,
            self.kind,
            self.columns,
            self.classes,
            [self.slide_ids[i] for i in idx],
            [self.patient_ids[i] for i in idx],
            self.y[idx],
            self.n_missing,
            dict(self.meta),
        )


SURVIVAL_PREFIX = "surv:"


def parse_task_specs(specs: str | list[str]) -> list[tuple[str, list[str]]]:
    """``"a,b,m=c+d"`` (or a list of such strings) -> ``[("a", ["a"]), ..., ("m", ["c","d"])]``.

    A survival spec ``os=surv:T:E`` keeps its one column as ``["surv:T:E"]`` (its name
    defaults to ``T``); :func:`build_task` reads it."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, cols = part.rpartition("=")
            if cols.strip().startswith(SURVIVAL_PREFIX):
                fields = [c.strip() for c in cols.strip()[len(SURVIVAL_PREFIX) :].split(":")]
                if len(fields) != 2 or not all(fields):
                    raise ValueError(
                        f"survival task spec {part!r}: expected NAME=surv:TIME_COL:EVENT_COL"
                    )
                out.append((name.strip() or fields[0], [SURVIVAL_PREFIX + ":".join(fields)]))
                continue
            columns = [c.strip() for c in cols.split("+") if c.strip()]
            if not columns:
                raise ValueError(f"task spec {part!r} names no column")
            out.append((name.strip() or "+".join(columns), columns))
    if not out:
        raise ValueError("no task given (e.g. --task infiltrated,subtype)")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    return out


def _binary_classes(values: set[str], where: str) -> list[str]:
    if len(values) != 2:
        raise ValueError(f"{where}: expected two classes, found {sorted(values)}")
    low = {v.lower(): v for v in values}
    pos = [low[k] for k in low if k in _POSITIVE]
    if len(pos) == 1:
        return [next(v for v in values if v != pos[0]), pos[0]]
    return sorted(values)


def _is_positive(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    raise ValueError(f"{where}: value {value!r} is not a binary label (use 0/1)")


def _survival_task(manifest, name: str, time_col: str, event_col: str, src) -> Task:
    """A survival task: ``y`` (n, 2) ``[time, event]``; rows with neither value are left out."""
    where = f"{src}, task {name!r}"
    rows, n_missing = [], 0
    for line, e in enumerate(manifest.entries, start=2):  # line 1 is the header
        t_raw, e_raw = e.labels.get(time_col, "").strip(), e.labels.get(event_col, "").strip()
        if not t_raw and not e_raw:
            n_missing += 1
            continue
        at = f"{where}: row {line} (slide {e.slide_id!r})"
        if not t_raw or not e_raw:
            gone = time_col if not t_raw else event_col
            raise ValueError(f"{at}: {gone!r} is missing while the other survival column is set")
        try:
            t = float(t_raw)
        except ValueError:
            raise ValueError(f"{at}: time {time_col}={t_raw!r} is not a number") from None
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"{at}: time {time_col}={t_raw!r} must be a finite number >= 0")
        if e_raw not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{at}: event {event_col}={e_raw!r} must be 1 (event) or 0 (censored)")
        rows.append((e, t, float(e_raw)))
    if not rows:
        raise ValueError(f"{where}: no slide with values in {time_col!r} and {event_col!r}")
    seen: dict[str, tuple[float, float, str]] = {}
    for e, t, ev in rows:  # follow-up belongs to the patient: every slide must agree
        first = seen.setdefault(e.patient_id, (t, ev, e.slide_id))
        if first[:2] != (t, ev):
            raise ValueError(
                f"{where}: patient {e.patient_id!r} has slides with different survival "
                f"({first[2]}: {first[0]:g}/{first[1]:g}, {e.slide_id}: {t:g}/{ev:g})"
            )
    y = np.array([[t, ev] for _, t, ev in rows], dtype=np.float64)
    if y[:, 1].sum() == 0:
        raise ValueError(f"{where}: no event among {len(y)} slides (every one censored)")
    sids = [e.slide_id for e, _, _ in rows]
    pids = [e.patient_id for e, _, _ in rows]
    return Task(name, "survival", [time_col, event_col], ["censored", "event"], sids, pids,
                y, n_missing)  # fmt: skip


def build_task(manifest, name: str, columns: list[str]) -> Task:
    """Encode the labels of ``columns`` in ``manifest`` (a ``data.manifest.Manifest``)."""
    src = getattr(manifest, "source", None) or "manifest"
    if len(columns) == 1 and columns[0].startswith(SURVIVAL_PREFIX):
        columns = columns[0][len(SURVIVAL_PREFIX) :].split(":")
        missing_cols = [c for c in columns if c not in manifest.label_columns]
        if missing_cols:
            raise ValueError(
                f"{src}: no survival column {missing_cols} (columns: {manifest.label_columns})"
            )
        return _survival_task(manifest, name, columns[0], columns[1], src)
    missing_cols = [c for c in columns if c not in manifest.label_columns]
    if missing_cols:
        raise ValueError(
            f"{src}: no label column {missing_cols} (columns: {manifest.label_columns})"
        )
    rows = [e for e in manifest.entries if all(e.labels.get(c, "").strip() for c in columns)]
    n_missing = len(manifest.entries) - len(rows)
    if not rows:
        raise ValueError(f"{src}: task {name!r} has no slide with labels in {columns}")
    sids = [e.slide_id for e in rows]
    pids = [e.patient_id for e in rows]
    raw = [[e.labels[c].strip() for c in columns] for e in rows]
    where = f"{src}, task {name!r}"
    if len(columns) > 1:
        y = np.array([[_is_positive(v, where) for v in r] for r in raw], dtype=np.int64)
        kind, classes = "multilabel", list(columns)
    elif any(";" in r[0] for r in raw):
        sets = [{t.strip() for t in r[0].split(";") if t.strip()} for r in raw]
        classes = sorted(set().union(*sets))
        y = np.array([[int(c in s) for c in classes] for s in sets], dtype=np.int64)
        kind = "multilabel"
    else:
        values = {r[0] for r in raw}
        if len(values) < 2:
            raise ValueError(f"{where}: only one class ({sorted(values)}) among labelled slides")
        if len(values) == 2:
            kind, classes = "binary", _binary_classes(values, where)
        else:
            kind, classes = "multiclass", sorted(values)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[r[0]] for r in raw], dtype=np.int64)
    if kind == "multilabel":
        counts = y.sum(axis=0)
        bad = [classes[i] for i in range(len(classes)) if counts[i] in (0, len(y))]
        if bad:
            raise ValueError(f"{where}: labels {bad} are constant over all slides")
    return Task(name, kind, list(columns), classes, sids, pids, y, n_missing)


def build_tasks(manifest, specs) -> list[Task]:
    """All tasks of a ``--task`` spec."""
    return [build_task(manifest, n, cols) for n, cols in parse_task_specs(specs)]


def stratification_key(task: Task, min_count: int) -> np.ndarray:
    """One discrete key per slide for stratified splitting.

    Binary / multi-class: the class. Multi-label: the label combination (e.g. ``"01001"``);
    combinations seen fewer than ``min_count`` times are pooled into one ``"rare"`` stratum
    (a combined-key approximation of iterative stratification, Sechidis et al. 2011).
    """
    if task.kind == "survival":
        return task.y[:, 1].astype(np.int64).astype(str)  # the event indicator
    if task.kind != "multilabel":
        return task.y.astype(str)
    keys = np.array(["".join(map(str, r)) for r in task.y])
    uniq, counts = np.unique(keys, return_counts=True)
    rare = set(uniq[counts < min_count])
    return np.array(["rare" if k in rare else k for k in keys])


def inner_key(task: Task, y: np.ndarray | None = None) -> np.ndarray:
    """The integer key of the inner (validation) splits: the class, the label combination
    or, for survival, the event indicator. ``y`` defaults to ``task.y``."""
    y = task.y if y is None else y
    if task.kind == "survival":
        return y[:, 1].astype(np.int64)
    if task.kind == "multilabel":
        return np.unique(y, axis=0, return_inverse=True)[1].reshape(-1)
    return y


_TIME_SUFFIXES = ("_months", "_time", "_days", "_years")


def default_task_specs(label_columns: list[str]) -> str:
    """Every label column as a task, except that a ``P_event`` column beside a ``P_months``
    (``_time``, ``_days``, ``_years``) column makes one survival task ``P=surv:...``."""
    cols, specs, used = list(label_columns), [], set()
    for c in cols:
        if c.endswith("_event"):
            stem = c[: -len("_event")]
            time = next((stem + s for s in _TIME_SUFFIXES if stem + s in cols), None)
            if time:
                specs.append(f"{stem}=surv:{time}:{c}")
                used |= {c, time}
    return ",".join([c for c in cols if c not in used] + specs)
