from types import SimpleNamespace as NS

import numpy as np
import pytest

from slidessl.data.tasks import build_task, build_tasks, parse_task_specs


def manifest(rows, cols):
    ents = [
        NS(slide_id=f"s{i}", patient_id=f"p{i}", labels=r, path=None) for i, r in enumerate(rows)
    ]
    return NS(entries=ents, label_columns=cols, source="m.csv")


def test_parse_specs():
    assert parse_task_specs(["a,b", "m=c+d"]) == [("a", ["a"]), ("b", ["b"]), ("m", ["c", "d"])]
    assert parse_task_specs("c+d") == [("c+d", ["c", "d"])]
    with pytest.raises(ValueError, match="repeat"):
        parse_task_specs("a,a")
    with pytest.raises(ValueError, match="no task"):
        parse_task_specs(" , ")


def test_binary_multiclass_multilabel_and_missing():
    rows = [
        {"mut": "MUT", "sub": "b", "g1": "1", "g2": "0", "ml": "x;y"},
        {"mut": "WT", "sub": "a", "g1": "0", "g2": "1", "ml": "y"},
        {"mut": "", "sub": "c", "g1": "1", "g2": "", "ml": "z"},
        {"mut": "WT", "sub": "a", "g1": "0", "g2": "1", "ml": "x"},
    ]
    m = manifest(rows, ["mut", "sub", "g1", "g2", "ml"])
    t = build_task(m, "mut", ["mut"])
    assert t.kind == "binary" and t.classes == ["WT", "MUT"] and t.n_missing == 1
    assert t.y.tolist() == [1, 0, 0] and t.slide_ids == ["s0", "s1", "s3"]
    t = build_task(m, "sub", ["sub"])
    assert t.kind == "multiclass" and t.classes == ["a", "b", "c"] and t.y.tolist() == [1, 0, 2, 0]
    t = build_task(m, "g", ["g1", "g2"])
    assert t.kind == "multilabel" and t.y.tolist() == [[1, 0], [0, 1], [0, 1]]
    t = build_task(m, "ml", ["ml"])
    assert t.kind == "multilabel" and t.classes == ["x", "y", "z"]
    np.testing.assert_array_equal(t.y, [[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_clear_errors():
    m = manifest([{"a": "1"}, {"a": "1"}], ["a"])
    with pytest.raises(ValueError, match="m.csv.*one class"):
        build_tasks(m, "a")
    with pytest.raises(ValueError, match="m.csv: no label column"):
        build_tasks(m, "b")
    m = manifest([{"a": "1", "b": "maybe"}, {"a": "0", "b": "1"}], ["a", "b"])
    with pytest.raises(ValueError, match="'maybe' is not a binary label"):
        build_tasks(m, "a+b")
