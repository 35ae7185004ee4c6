"""Patient-grouped, label-stratified k-fold splits, written once and reused by every method.

Folds come from ``sklearn.model_selection.StratifiedGroupKFold``: every slide of a patient
lands in the same fold, and class proportions are kept as close as the patient grouping
allows. Unlike the repeated random splits of the original comparison, the k test sets are
disjoint and together cover every labelled slide exactly once.

The folds file (JSON) holds one assignment per task::

    {"format": "slidessl-folds/1", "k": 10, "seed": 0,
     "tasks": {"infiltrated": {"kind": "binary", "columns": ["infiltrated"],
                               "folds": {"slide_0001": 3, ...}}}}

``resolve_folds`` reads the file when it holds the task, checks it (every slide of the task
present, no patient in two folds) and otherwise computes the task's folds and adds them to
the file, so the next method run sees exactly the same split. ``grouped_stratified_split`` is
the fast seeded splitter of the inner CV (probe C selection, ABMIL early stopping).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from slidessl.atomic import atomic_write_bytes
from slidessl.data.tasks import Task, stratification_key

log = logging.getLogger(__name__)
FORMAT = "slidessl-folds/1"


def make_folds(task: Task, k: int = 10, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of each slide of ``task``."""
    groups = np.asarray(task.patient_ids)
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise ValueError(f"task {task.name!r}: {n_groups} patients cannot fill {k} folds")
    key = stratification_key(task, min_count=k)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(groups), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is logged below
        for i, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), key, groups)):
            fold[test] = i
    _, counts = np.unique(key, return_counts=True)
    if counts.min() < k:
        log.warning(
            "task %r: smallest stratum has %d slides (< %d folds); some folds lack it",
            task.name,
            counts.min(),
            k,
        )
    return fold


def grouped_stratified_split(y: np.ndarray, groups: np.ndarray, k: int, seed: int = 0):
    """Fold index of each slide for the *inner* CV of the probe and ABMIL: patients are keyed
    by their highest label, shuffled, and dealt round-robin into ``k`` folds within each key.
    The outer folds (``make_folds``) come from StratifiedGroupKFold, which is too slow to
    call once per (task, outer fold, label) here; this one is vectorised and seeded."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    key = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(key, inv, y.astype(np.int64))
    patient_fold = np.empty(len(uniq), dtype=np.int64)
    for kv in np.unique(key):
        members = rng.permutation(np.where(key == kv)[0])
        patient_fold[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return patient_fold[inv]


def check_folds(task: Task, fold: np.ndarray, where: str = "folds") -> None:
    """Raise if a patient spans two folds or a fold is empty."""
    owner: dict[str, int] = {}
    for pid, f in zip(task.patient_ids, fold):
        if owner.setdefault(pid, int(f)) != int(f):
            raise ValueError(
                f"{where}: patient {pid!r} of task {task.name!r} is in folds "
                f"{owner[pid]} and {int(f)}"
            )
    k = int(fold.max()) + 1
    empty = sorted(set(range(k)) - set(fold.tolist()))
    if empty:
        raise ValueError(f"{where}: task {task.name!r} has empty folds {empty}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read folds file ({exc})") from exc
    if data.get("format") != FORMAT or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: not a slidessl folds file (format {FORMAT!r} expected)")
    return data


def _write(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def resolve_folds(task: Task, path: str | Path | None, k: int = 10, seed: int = 0) -> np.ndarray:
    """Folds of ``task`` from ``path`` (created or extended when needed); (n,) fold index."""
    if path is None:
        fold = make_folds(task, k, seed)
        check_folds(task, fold)
        return fold
    path = Path(path)
    data = _read(path) if path.exists() else {"format": FORMAT, "k": k, "seed": seed, "tasks": {}}
    entry = data["tasks"].get(task.name)
    if entry is None:
        fold = make_folds(task, int(data["k"]), int(data["seed"]))
        check_folds(task, fold, str(path))
        data["tasks"][task.name] = {
            "kind": task.kind,
            "columns": task.columns,
            "folds": {s: int(f) for s, f in zip(task.slide_ids, fold)},
        }
        _write(path, data)
        log.info("wrote folds of task %r to %s", task.name, path)
        return fold
    stored = entry["folds"]
    absent = [s for s in task.slide_ids if s not in stored]
    if absent:
        raise ValueError(
            f"{path}: task {task.name!r} folds lack {len(absent)} labelled slides "
            f"(e.g. {absent[:3]}); the manifest changed since the folds were made"
        )
    fold = np.array([int(stored[s]) for s in task.slide_ids], dtype=np.int64)
    check_folds(task, fold, str(path))
    return fold
