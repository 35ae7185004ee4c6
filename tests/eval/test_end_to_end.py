"""CLI end to end on a tiny synthetic cohort: embed (meanpool, random) -> probe -> abmil ->
retrieve -> report, multi-label task included."""

import json
import re

import numpy as np
import pytest

from slidessl.cli import main
from slidessl.data.synthetic import make_cohort
from slidessl.eval.embed_io import read_embeddings


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, 40, seed=3, dim=16, min_tiles=40, max_tiles=120)


def test_embed_probe_multilabel_retrieve_report(cohort, tmp_path, capsys):
    emb = tmp_path / "meanpool.h5"
    assert main(["embed", "meanpool", str(cohort), "--out", str(emb)]) == 0
    ids, X, attrs = read_embeddings(emb)
    assert len(ids) == 40 and X.shape == (40, 16) and attrs["encoder"] == "meanpool"
    # resumable: a second run writes nothing new and keeps the vectors
    assert main(["embed", "meanpool", str(cohort), "--out", str(emb)]) == 0
    assert "embedded 0 slides (40 already there)" in capsys.readouterr().out
    np.testing.assert_array_equal(read_embeddings(emb)[1], X)

    folds = tmp_path / "folds.json"
    task = "tumor_high,mut=EGFR+FAT1+KRAS+LRP1B+TP53"
    args = [
        "probe",
        str(emb),
        str(cohort),
        "--task",
        task,
        "--folds",
        str(folds),
        "--k",
        "4",
        "--bootstrap",
        "100",
        "--out",
        str(tmp_path / "probe"),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "mut" in table and "(micro)" in table
    doc = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    mut = doc["tasks"]["mut"]
    assert mut["kind"] == "multilabel" and len(mut["per_class_pooled"]["auroc"]) == 5
    assert 0 <= mut["auroc_micro_mean"] <= 1 and len(mut["per_fold"]) == 4
    assert doc["tasks"]["tumor_high"]["auroc_mean"] > 0.6  # composition: mean pooling sees it

    assert (
        main(
            [
                "abmil",
                str(cohort),
                "--task",
                "tumor_high",
                "--folds",
                str(folds),
                "--jobs",
                "2",
                "--epochs",
                "2",
                "--train-tiles",
                "32",
                "--bootstrap",
                "50",
                "--out",
                str(tmp_path / "abmil"),
            ]
        )
        == 0
    )
    ab = json.loads((tmp_path / "abmil" / "metrics.json").read_text())
    pr = np.load(tmp_path / "probe" / "predictions.npz")
    abp = np.load(tmp_path / "abmil" / "predictions.npz")
    # same folds for both methods
    np.testing.assert_array_equal(pr["tumor_high/fold"], abp["tumor_high/fold"])
    assert ab["tasks"]["tumor_high"]["n_slides"] == 40

    assert (
        main(
            [
                "retrieve",
                str(emb),
                str(cohort),
                "--label",
                "subtype",
                "--out",
                str(tmp_path / "retr"),
            ]
        )
        == 0
    )
    r = json.loads((tmp_path / "retr" / "retrieval.json").read_text())
    assert 0 <= r["acc@1"] <= r["acc@3"] <= r["acc@5"] <= 1

    assert main(["report", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    got = {(row["method"], row["task"]) for row in rep["results"]}
    assert {("meanpool", "tumor_high"), ("meanpool", "mut"), ("abmil", "tumor_high")} <= got
    assert (tmp_path / "figures" / "curves_mut.png").stat().st_size > 1000
    assert "| meanpool | tumor_high |" in (tmp_path / "report.md").read_text()


def test_random_encoder_embedding_is_deterministic_and_batch_invariant(cohort, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert main(["embed", "random:tiny", str(cohort), "--out", str(a), "--batch-size", "1"]) == 0
    assert main(["embed", "random:tiny", str(cohort), "--out", str(b), "--batch-size", "5"]) == 0
    ia, xa, _ = read_embeddings(a)
    ib, xb, _ = read_embeddings(b)
    assert ia == ib and xa.shape[1] == 64
    np.testing.assert_allclose(xa, xb, atol=1e-4)
    assert np.abs(xa - xa.mean(0)).max() > 1e-3  # not a constant vector


def test_bad_inputs_name_the_file(cohort, tmp_path, capsys):
    emb = tmp_path / "x.h5"

    def fails(argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(needle, err), err

    fails(["embed", str(tmp_path / "missing"), str(cohort), "--out", str(emb)], "no such encoder")
    fails(
        ["probe", str(emb), str(cohort), "--task", "tumor_high", "--out", str(tmp_path)],
        "embeddings file does not exist",
    )
    assert main(["embed", "meanpool", str(cohort), "--out", str(emb)]) == 0
    fails(
        ["embed", "random:tiny", str(cohort), "--out", str(emb)],
        "x.h5: holds embeddings made with spec=.meanpool.",
    )
    fails(
        ["probe", str(emb), str(cohort), "--task", "nope", "--out", str(tmp_path)],
        "no label column",
    )


@pytest.mark.parametrize("spec,dim", [("prototypes:4", 4 + 4 * 16), ("cooc:4", 4 + 4 * 16 + 20)])
def test_embed_prototype_baselines(cohort, tmp_path, capsys, spec, dim):
    """The label-free baselines are `slidessl embed` encoders: seeded, resumable, label-free
    (a manifest without label columns gives the same vectors)."""
    import csv

    emb = tmp_path / "p.h5"
    assert main(["embed", spec, str(cohort), "--out", str(emb)]) == 0
    ids, X, attrs = read_embeddings(emb)
    assert X.shape == (40, dim) and attrs["encoder"].startswith(spec + ":seed0:")
    assert main(["embed", spec, str(cohort), "--out", str(emb)]) == 0
    assert "embedded 0 slides (40 already there)" in capsys.readouterr().out
    rows = list(csv.DictReader(cohort.open()))
    bare = tmp_path / "bare.csv"
    with bare.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path"])
        w.writerows([r["slide_id"], str(cohort.parent / r["path"])] for r in rows)
    other = tmp_path / "bare.h5"
    assert main(["embed", spec, str(bare), "--out", str(other)]) == 0
    ids2, X2, _ = read_embeddings(other)
    assert ids2 == ids
    np.testing.assert_array_equal(X2, X)
    # another seed is another fit: refusing to resume into the first file names it
    assert main(["embed", spec, str(cohort), "--out", str(emb), "--seed", "1"]) == 2
    assert "p.h5" in capsys.readouterr().err
