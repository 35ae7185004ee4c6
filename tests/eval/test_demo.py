"""`slidessl demo` end to end at toy size: three recipes, every baseline, one table."""

import json

import pytest

from slidessl.cli import main


@pytest.mark.slow
def test_demo_compares_three_recipes_and_every_baseline(tmp_path, capsys):
    from slidessl.data.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "cohort", 40, seed=4, dim=16, min_tiles=60, max_tiles=160)
    out = tmp_path / "demo"
    code = main(
        [
            "demo", "--out", str(out), "--manifest", str(manifest), "--k", "3",
            "--task", "tumor_high,infiltrated", "--prototypes", "4", "--draws", "3",
            "train.max_steps=2", "train.progress=false", "data.num_workers=0",
            "crops.region_max_tiles=64", "crops.global_max_tiles=40", "crops.local_max_tiles=12",
            "dino.out_dim=64", "ibot.out_dim=64",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    methods = ["dino", "dinov2", "dinov2_grid", "random-init", "meanpool", "prototypes", "cooc"]
    methods += ["random-init-pca"]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for m in methods + ["abmil"]:
        label = {"random-init-pca": "random-init + PCA whitening", "abmil": "ABMIL"}.get(m, m)
        assert sum(label in line for line in rows) >= 2, m  # the AUROC and few-shot tables
    report = json.loads((out / "report.json").read_text())
    got = {(r["method"], r["task"]) for r in report["results"]}
    assert {(m, t) for m in methods + ["abmil"] for t in ("tumor_high", "infiltrated")} <= got
    # few-shot for every method, on the same draws (the same K values and draw count)
    few = {(r["method"], r["task"]): r for r in report["results"] if r.get("fewshot_mean")}
    assert {(m, t) for m in methods + ["abmil"] for t in ("tumor_high", "infiltrated")} <= set(few)
    assert {tuple(r["fewshot_shots"]) for r in few.values()} == {(1, 2, 4, 8)}
    # a plain verdict per pretrained recipe against its random init
    assert len(report["random_init_verdict"]) == 3
    assert all("vs its random init" in v for v in report["random_init_verdict"])
    assert any("MVAcc@5" in line for line in text.splitlines())
    # one verdict per pretrained recipe and task, against the baselines only
    assert len(report["verdict"]) == 3 * 2
    assert all("baseline" in v for v in report["verdict"])
    folds = json.loads((out / "folds.json").read_text())
    assert set(folds["tasks"]) == {"tumor_high", "infiltrated"}
    run = json.loads((out / "run.json").read_text())
    assert run["focus"] == ["dino", "dinov2", "dinov2_grid"]
    # diagnostics of the first recipe, its random init and mean pooling, in the report
    assert [d["method"] for d in report["diagnose"]] == ["dino", "meanpool", "random-init"]
    by = {d["method"]: d for d in report["diagnose"]}
    assert by["meanpool"]["coordinate_shuffle"]["shuffle_shift"] < 1e-6
    assert by["dino"]["coordinate_shuffle"]["shuffle_shift"] > 0
    assert "## Diagnostics" in (out / "report.md").read_text()
