import json

import numpy as np
import pytest

from slidessl.data.tasks import Task
from slidessl.eval.folds import make_folds, resolve_folds


def random_task(rng, n_patients=120, kind="binary"):
    sizes = rng.integers(1, 4, n_patients)
    pids = [f"p{i}" for i, s in enumerate(sizes) for _ in range(s)]
    n = len(pids)
    if kind == "binary":
        y = (rng.random(n) < 0.3).astype(int)
    else:
        y = (rng.random((n, 3)) < 0.4).astype(int)
    return Task("t", kind, ["t"], ["0", "1"], [f"s{i}" for i in range(n)], pids, y)


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_no_patient_in_two_folds_and_every_slide_once(rng, kind):
    task = random_task(rng, kind=kind)
    fold = make_folds(task, k=10, seed=int(rng.integers(1000)))
    assert fold.min() == 0 and fold.max() == 9
    owner = {}
    for pid, f in zip(task.patient_ids, fold):
        assert owner.setdefault(pid, f) == f


def test_folds_are_stratified(rng):
    task = random_task(rng, n_patients=400)
    fold = make_folds(task, k=5, seed=1)
    overall = task.y.mean()
    for f in range(5):
        assert abs(task.y[fold == f].mean() - overall) < 0.06


def test_folds_file_is_written_then_reused(tmp_path, rng):
    task = random_task(rng)
    path = tmp_path / "folds.json"
    first = resolve_folds(task, path, k=5, seed=7)
    data = json.loads(path.read_text())
    assert data["k"] == 5 and set(data["tasks"]["t"]["folds"]) == set(task.slide_ids)
    # a different seed / k asked later must not change stored folds: every method sees them
    again = resolve_folds(task, path, k=10, seed=99)
    np.testing.assert_array_equal(first, again)
    # a task added later gets the file's k, and the first task stays untouched
    other = random_task(rng)
    other.name = "u"
    assert resolve_folds(other, path, k=3).max() == 4
    assert json.loads(path.read_text())["tasks"]["t"] == data["tasks"]["t"]


def test_reuse_rejects_changed_cohort_and_split_patients(tmp_path, rng):
    task = random_task(rng)
    path = tmp_path / "folds.json"
    resolve_folds(task, path, k=5)
    bigger = Task(
        "t",
        "binary",
        ["t"],
        ["0", "1"],
        task.slide_ids + ["new"],
        task.patient_ids + ["pnew"],
        np.append(task.y, 1),
    )
    with pytest.raises(ValueError, match="folds.json.*lack 1 labelled slides"):
        resolve_folds(bigger, path)
    data = json.loads(path.read_text())
    pid = task.patient_ids[0]
    sids = [s for s, p in zip(task.slide_ids, task.patient_ids) if p == pid]
    if len(sids) == 1:  # make the first patient own two slides
        task.patient_ids[1] = pid
        sids = task.slide_ids[:2]
    data["tasks"]["t"]["folds"][sids[0]] = (data["tasks"]["t"]["folds"][sids[1]] + 1) % 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"patient '{pid}'.*in folds"):
        resolve_folds(task, path)


def test_too_few_patients(rng):
    task = random_task(rng, n_patients=4)
    with pytest.raises(ValueError, match="4 patients cannot fill 10 folds"):
        make_folds(task, k=10)
