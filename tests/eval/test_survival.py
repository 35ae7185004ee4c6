"""Survival endpoints: C-index, Cox partial likelihood, Cox probe, Cox loss, tasks, folds."""

import json

import numpy as np
import pytest
import torch

from slidessl.cli import main
from slidessl.data.manifest import Manifest, ManifestEntry
from slidessl.data.tasks import build_tasks, default_task_specs, parse_task_specs
from slidessl.eval.cox_loss import cox_ph_loss
from slidessl.eval.coxprobe import fit_path, partial_log_likelihood, probe_survival
from slidessl.eval.folds import check_folds, make_folds
from slidessl.eval.survival import (
    bootstrap_cindex,
    harrell_cindex,
    median_split,
    per_patient,
    uno_cindex,
)


def _pairs_cindex(t, e, r) -> float:
    """Harrell's C by looping over every ordered pair (scikit-survival's convention: a tie in
    time is comparable when the later-listed one is censored)."""
    num = den = 0.0
    for i in range(len(t)):
        for j in range(len(t)):
            if not e[i]:
                continue
            if t[i] < t[j] or (t[i] == t[j] and not e[j]):
                den += 1
                num += 1.0 if r[i] > r[j] else (0.5 if r[i] == r[j] else 0.0)
    return num / den


def _data(rng, n, ties=True):
    t = rng.integers(1, 15, n).astype(float) if ties else rng.exponential(10, n)
    e = rng.random(n) < 0.7
    r = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
    return t, e, r


def test_harrell_matches_pair_count_and_sksurv(rng):
    from sksurv.metrics import concordance_index_censored

    for ties in (True, False):
        t, e, r = _data(rng, 60, ties)
        c = harrell_cindex(t, e, r)
        assert c == pytest.approx(_pairs_cindex(t, e, r), abs=1e-12)
        assert c == pytest.approx(concordance_index_censored(e, t, r)[0], abs=1e-12)
    # rows of a batch are independent
    T, E, R = (np.stack(a) for a in zip(*[_data(rng, 30) for _ in range(5)]))
    np.testing.assert_allclose(
        harrell_cindex(T, E, R), [harrell_cindex(T[i], E[i], R[i]) for i in range(5)]
    )
    assert harrell_cindex([1.0, 2.0], [False, False], [0.0, 1.0]) != harrell_cindex(
        [1.0, 2.0], [True, False], [1.0, 0.0]
    )  # no comparable pair -> nan (nan != 1.0)
    assert np.isnan(harrell_cindex([1.0, 2.0], [False, False], [0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        harrell_cindex([1.0, 2.0], [True, True], [np.nan, 1.0])


def test_bootstrap_ci_and_uno(rng):
    n = 200
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-x))
    c = rng.exponential(2.0, n)
    time, event = np.minimum(t, c), t <= c
    ci, n_valid = bootstrap_cindex(time, event, x, n_boot=300, seed=1)
    point = harrell_cindex(time, event, x)
    assert n_valid == 300 and ci[0] < point < ci[1] and 0.02 < ci[1] - ci[0] < 0.2
    uno, tau = uno_cindex(time, event, x)
    assert tau == pytest.approx(np.quantile(time, 0.8))
    assert abs(uno - point) < 0.05  # the same ranking, weighted for censoring
    assert uno_cindex(time, event, -x)[0] == pytest.approx(1 - uno, abs=1e-9)


def test_partial_likelihood_brute_force_and_cox_loss_gradient(rng):
    t, e, _ = _data(rng, 25)  # tied times
    eta = rng.normal(size=25)
    brute = sum(eta[i] - np.log(np.exp(eta[t >= t[i]]).sum()) for i in range(25) if e[i])
    assert partial_log_likelihood(eta, t, e) == pytest.approx(brute, rel=1e-12)
    tt, ee = torch.tensor(t), torch.tensor(e)
    h = torch.tensor(eta, requires_grad=True)
    loss = cox_ph_loss(h, tt, ee)
    assert float(loss.detach()) == pytest.approx(-brute, rel=1e-12)
    assert float(cox_ph_loss(h, tt, ee, "mean").detach()) == pytest.approx(
        -brute / e.sum(), rel=1e-12
    )
    assert torch.autograd.gradcheck(lambda x: cox_ph_loss(x, tt, ee), (h,), eps=1e-6, atol=1e-7)
    # analytic gradient: -e_i + sum over events k with t_i >= t_k of softmax weight of i
    w = np.array(
        [
            -float(e[i])
            + sum(
                np.exp(eta[i]) / np.exp(eta[t >= t[k]]).sum()
                for k in range(25)
                if e[k] and t[i] >= t[k]
            )  # fmt: skip
            for i in range(25)
        ]
    )
    loss.backward()
    np.testing.assert_allclose(h.grad.numpy(), w, rtol=1e-10, atol=1e-12)
    none = torch.zeros(3, requires_grad=True)
    z = cox_ph_loss(none, torch.ones(3), torch.zeros(3))
    z.backward()
    assert float(z.detach()) == 0.0 and torch.all(none.grad == 0)
    with pytest.raises(ValueError, match="alike"):
        cox_ph_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3))


def test_cox_fit_matches_unpenalised_library_fit(rng):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    n, beta = 800, np.array([0.8, -0.5, 0.0])
    X = rng.normal(size=(n, 3))
    t = rng.exponential(np.exp(-X @ beta))
    c = rng.exponential(2.0, n)
    time, event = np.minimum(t, c), t <= c
    ref = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(X, Surv.from_arrays(event, time))
    alphas, coefs = fit_path(X, time, event, l1_ratio=0.5, alphas=[1e-6])
    np.testing.assert_allclose(coefs[:, 0], ref.coef_, atol=2e-3)
    np.testing.assert_allclose(ref.coef_, beta, atol=0.12)  # the data's known hazard
    # the fitted coefficients maximise the partial likelihood (a nudge lowers it)
    best = partial_log_likelihood(X @ coefs[:, 0], time, event)
    for d in np.eye(3) * 0.05:
        assert partial_log_likelihood(X @ (coefs[:, 0] + d), time, event) < best


def _surv_manifest(rows):
    entries = [
        ManifestEntry(f"s{i}", f"s{i}.h5", pid, {"os_months": t, "os_event": ev, "y": "1"})
        for i, (pid, t, ev) in enumerate(rows)
    ]
    return Manifest(entries, ["os_months", "os_event", "y"], "m.csv")


def test_survival_task_spec_and_errors():
    assert parse_task_specs("os=surv:os_months:os_event") == [("os", ["surv:os_months:os_event"])]
    assert parse_task_specs("surv:a:b")[0][0] == "a"
    with pytest.raises(ValueError, match="surv:TIME_COL:EVENT_COL"):
        parse_task_specs("os=surv:os_months")
    ok = [("p1", "12.5", "1"), ("p1", "12.5", "1"), ("p2", "3", "0"), ("p3", "", "")]
    (task,) = build_tasks(_surv_manifest(ok), "os=surv:os_months:os_event")
    assert task.kind == "survival" and task.columns == ["os_months", "os_event"]
    np.testing.assert_array_equal(task.y, [[12.5, 1], [12.5, 1], [3, 0]])
    assert task.n_missing == 1
    bad = {
        "-1": ("p2", "-1", "0"),
        "not a number": ("p2", "abc", "0"),
        "must be 1 \\(event\\) or 0": ("p2", "3", "2"),
        "'os_event' is missing": ("p2", "3", ""),
        "different survival": ("p1", "13", "1"),
    }
    for msg, row in bad.items():
        with pytest.raises(ValueError, match=msg) as err:
            build_tasks(_surv_manifest([*ok[:2], row]), "os=surv:os_months:os_event")
        if "different" not in msg:
            assert "row 4 (slide 's2')" in str(err.value)  # header is line 1
    with pytest.raises(ValueError, match="no event"):
        build_tasks(_surv_manifest([("p1", "3", "0")]), "os=surv:os_months:os_event")
    with pytest.raises(ValueError, match="no survival column"):
        build_tasks(_surv_manifest(ok), "os=surv:time:os_event")
    assert default_task_specs(["a", "os_months", "os_event", "pfs_days", "pfs_event"]) == (
        "a,os=surv:os_months:os_event,pfs=surv:pfs_days:pfs_event"
    )


def test_survival_folds_keep_patients_and_balance_events(rng):
    rows = []
    for p in range(90):
        ev = str(int(rng.random() < 0.3))
        t = f"{rng.uniform(1, 100):.1f}"
        rows += [(f"p{p}", t, ev)] * int(rng.choice([1, 2, 3]))
    (task,) = build_tasks(_surv_manifest(rows), "os=surv:os_months:os_event")
    fold = make_folds(task, k=5, seed=3)
    check_folds(task, fold)  # no patient in two folds, none empty
    rate = task.y[:, 1].mean()
    for f in range(5):
        assert abs(task.y[fold == f, 1].mean() - rate) < 0.12


def test_cox_probe_recovers_hazard_and_ranks(rng):
    n_pat = 120
    pids = np.repeat([f"p{i}" for i in range(n_pat)], 2)
    z = np.repeat(rng.normal(size=n_pat), 2)
    t = np.repeat(rng.exponential(1.0, n_pat), 2) * np.exp(-z)
    c = np.repeat(rng.exponential(3.0, n_pat), 2)
    time, event = np.minimum(t, c), (t <= c).astype(float)
    X = np.column_stack([z + 0.1 * rng.normal(size=len(z)), rng.normal(size=(len(z), 20))])
    rows = [(p, f"{ti:.6f}", str(int(e))) for p, ti, e in zip(pids, time, event)]
    (task,) = build_tasks(_surv_manifest(rows), "os=surv:os_months:os_event")
    fold = make_folds(task, k=5, seed=0)
    scores, alphas = probe_survival(X, task, fold, seed=0)
    assert scores.shape == (len(X),) and len(alphas) == 5
    _, tp, ep, rp = per_patient(task.patient_ids, task.y, scores)
    ceiling = harrell_cindex(tp, ep, per_patient(task.patient_ids, task.y, z)[3])
    assert harrell_cindex(tp, ep, rp) > ceiling - 0.03
    assert harrell_cindex(tp, ep, rp) > 0.65
    split = median_split(tp, ep, rp)
    assert split["n_high"] + split["n_low"] == n_pat and split["logrank_p"] < 0.01


def test_abmil_cox_trains(rng):
    from slidessl.eval.abmil import ABMILConfig, run_abmil

    n = 40
    risk = rng.normal(size=n)
    feats = {}
    rows = []
    for i in range(n):
        x = rng.normal(size=(30, 8)).astype(np.float32)
        x[:, 0] += risk[i]
        feats[f"s{i}"] = torch.from_numpy(x)
        t = rng.exponential(np.exp(-2 * risk[i]))
        rows.append((f"p{i}", f"{t:.5f}", str(int(rng.random() < 0.8))))
    (task,) = build_tasks(_surv_manifest(rows), "os=surv:os_months:os_event")
    fold = make_folds(task, k=4, seed=0)
    cfg = ABMILConfig(epochs=8, batch_size=10, proj_dim=16, attn_dim=8, lr=3e-3, seed=1)
    tasks, folds, scores, logs = run_abmil(feats, [task], [fold], cfg, progress=False)
    assert scores[0].shape == (n,) and np.all(np.isfinite(scores[0]))
    _, tp, ep, rp = per_patient(tasks[0].patient_ids, tasks[0].y, scores[0])
    assert harrell_cindex(tp, ep, rp) > 0.6
    assert all(np.isfinite(f["best_val_loss"]) for f in logs[0])


def test_probe_cli_survival_report(tmp_path, rng):
    """probe -> metrics.json C-index fields -> report: C-index table, KM figure, json rows."""
    from slidessl.eval.embed_io import EmbeddingWriter

    n = 60
    z = rng.normal(size=n)
    t = rng.exponential(np.exp(-z))
    lines = ["slide_id,path,patient_id,os_months,os_event"]
    lines += [f"s{i},s{i}.h5,p{i},{t[i]:.4f},{int(rng.random() < 0.8)}" for i in range(n)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    X = np.column_stack([z, rng.normal(size=(n, 5))]).astype(np.float32)
    with EmbeddingWriter(tmp_path / "e.h5", {"encoder": "test"}) as w:
        w.write([f"s{i}" for i in range(n)], X)
    out = tmp_path / "run" / "probe"
    argv = ["probe", str(tmp_path / "e.h5"), str(tmp_path / "m.csv"), "--k", "3", "--task",
            "os=surv:os_months:os_event", "--out", str(out), "--bootstrap", "200"]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((out / "metrics.json").read_text())["tasks"]["os"]
    assert s["kind"] == "survival" and s["n_patients"] == n and s["k"] == 3
    assert s["cindex_ci"][0] < s["cindex_pooled"] < s["cindex_ci"][1]
    assert len(s["per_fold"]) == 3 and np.isfinite(s["cindex_std"]) and s["cindex_mean"] > 0.6
    assert set(s["median_split"]) >= {"n_high", "n_low", "logrank_p"}
    pred = np.load(out / "predictions.npz")
    assert pred["os/y"].shape == (n, 2) and pred["os/patient_ids"].shape == (n,)
    assert main(["report", str(tmp_path / "run")]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    (row,) = rep["results"]
    assert row["kind"] == "survival" and row["cindex_mean"] == pytest.approx(s["cindex_mean"])
    assert row["cindex_ci"] == pytest.approx(s["cindex_ci"]) and row["cindex_std"] is not None
    assert (tmp_path / "run" / "figures" / "km_os.png").exists()
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Survival" in md and "km_os.png" in md and "curves_os" not in md


def test_bad_survival_spec_exits_2(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("slide_id,path,os_months,os_event\ns0,s0.h5,-3,1\n")
    argv = ["probe", "e.h5", str(tmp_path / "m.csv"), "--task", "os=surv:os_months:os_event",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "row 2 (slide 's0')" in err and ">= 0" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_runs_survival_beside_the_other_tasks(tmp_path, capsys):
    from slidessl.data.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "cohort", 40, seed=5, dim=16, min_tiles=60, max_tiles=160)
    out = tmp_path / "demo"
    code = main(
        [
            "demo", "--out", str(out), "--manifest", str(manifest), "--k", "3", "--recipes",
            "dino", "--task", "tumor_high,os=surv:os_months:os_event", "--prototypes", "4",
            "--draws", "3", "--fewshot-tasks", "tumor_high", "train.max_steps=2",
            "train.progress=false", "data.num_workers=0", "crops.region_max_tiles=64",
            "crops.global_max_tiles=40", "crops.local_max_tiles=12", "dino.out_dim=64",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "Survival (per patient" in text and "true log-hazard (ceiling)" in text
    auroc = text.split("AUROC with all labels")[1].split("Survival (per patient")[0]
    assert "ceiling" not in auroc  # the ceiling has a survival row only
    report = json.loads((out / "report.json").read_text())
    surv = {r["method"]: r for r in report["results"] if r["task"] == "os"}
    methods = {"dino", "random-init", "random-init-pca", "meanpool", "prototypes", "cooc"}
    assert methods | {"abmil", "ceiling"} <= set(surv)
    for r in surv.values():
        assert r["kind"] == "survival" and r["cindex_ci"][0] <= r["cindex_pooled"]
        assert r["cindex_pooled"] <= r["cindex_ci"][1]
    assert surv["ceiling"]["cindex_pooled"] > 0.6  # the true log hazard ranks well
    assert any(v.startswith("`os`: dino C-index") for v in report["survival_verdict"])
    assert (out / "figures" / "km_os.png").exists()
    assert json.loads((out / "run.json").read_text())["survival_tasks"] == ["os"]
    assert "os" not in json.loads((out / "run.json").read_text())["tasks"]
