"""Training health: a non-finite *gradient* skips the step, the guard names what blew up,
the weights' drift and the label-aware monitor are logged, the random init is step 0."""

import csv
import json

import numpy as np
import pytest
import torch

from slidessl.cli import main as cli_main
from slidessl.data.manifest import load_manifest
from slidessl.data.synthetic import make_cohort
from slidessl.data.tasks import build_tasks
from slidessl.eval.embed import build_embedder
from slidessl.eval.embed_io import read_embeddings
from slidessl.ssl.meta import SSLMetaArch
from slidessl.train.health import LossStall, WeightDrift, grad_culprits, grad_norms
from slidessl.train.label_monitor import knn_auroc, knn_scores
from slidessl.train.loop import pretrain
from slidessl.train.optim import build_optimizer, param_groups
from slidessl.train.schedules import build_schedules
from slidessl.train.step import optimizer_step

from .conftest import random_slide


class _NaNGrad(torch.autograd.Function):
    """Identity forward (times zero in the loss: the loss stays finite); NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poison(module_path):
    """A ``compute_loss`` wrapper whose loss is unchanged but whose gradient of the weight
    of ``module_path`` (in the student backbone) is NaN."""
    real = SSLMetaArch.compute_loss

    def poisoned(self, batch, teacher_temp):
        loss, logs = real(self, batch, teacher_temp)
        w = self.student["backbone"].get_submodule(module_path).weight
        return loss + 0.0 * _NaNGrad.apply(w).sum(), logs

    return poisoned


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, n_slides=12, seed=5, dim=16, min_tiles=80, max_tiles=200)


def _cfg(tiny_cfg, cohort, out, *extra):
    return tiny_cfg("dinov2", f"data.manifest={cohort}", f"out={out}", "train.batch_size=2", *extra)


def test_grad_norms_one_reduction_and_culprits(rng):
    a = torch.nn.Linear(3, 4)
    b = torch.nn.Linear(4, 2)
    (b(a(torch.randn(5, 3))).square().sum()).backward()
    params = list(a.parameters()) + list(b.parameters())
    total, norms = grad_norms(params)
    want = torch.cat([p.grad.flatten() for p in params]).double().norm()
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, want, rtol=1e-6, atol=0)
    # 1e30 entries: finite, but a float32 sum of squares would overflow to inf
    a.weight.grad.fill_(1e30)
    big, _ = grad_norms(params)
    assert torch.isfinite(big) and float(big) > 1e30
    named = [("a.weight", a.weight), ("a.bias", a.bias), ("b.weight", b.weight)]
    b.weight.grad[0, 0] = float("nan")
    _, norms = grad_norms([p for _, p in named])
    assert grad_culprits(named, norms).startswith("b (nan)")


def test_step_with_nonfinite_gradient_is_skipped_not_applied(tiny_cfg, make_batch, rng):
    cfg = tiny_cfg("dinov2", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0")
    torch.manual_seed(int(rng.integers(1 << 30)))
    arch = SSLMetaArch.from_config(cfg, feature_dim=16)
    opt = build_optimizer(param_groups(arch.student, 1.0), cfg)
    sched = build_schedules(cfg, steps_per_epoch=4, global_batch=2).at(0)
    batch = make_batch(cfg, [random_slide(rng, i) for i in range(2)])
    before = {k: v.clone() for k, v in arch.state_dict().items()}
    poisoned = _poison("blocks.0.ffn.fc1")
    arch.compute_loss = poisoned.__get__(arch)
    res = optimizer_step(arch, arch, opt, [batch], sched, device=torch.device("cpu"), clip_grad=3.0)
    assert res["finite"] == 0.0 and res["skip_reason"] == "non-finite gradient"
    assert np.isfinite(res["loss"]) and not np.isfinite(res["grad_norm"])
    assert "blocks.0.ffn.fc1" in res["culprits"]
    for k, v in arch.state_dict().items():  # student, teacher and centres untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in arch.student.parameters())
    # the next, healthy step trains and reports its update
    del arch.compute_loss
    drift = WeightDrift(list(arch.student["backbone"].parameters()))
    res = optimizer_step(
        arch, arch, opt, [batch], sched, device=torch.device("cpu"), clip_grad=3.0, drift=drift
    )
    assert res["finite"] == 1.0 and np.isfinite(res["grad_norm"]) and res["grad_norm"] > 0
    assert 0.0 < res["update_ratio"] < 0.5 and 0.0 < drift.distance() < 0.5


def test_guard_skips_gradient_blowups_and_stops_naming_the_module(
    tiny_cfg, cohort, tmp_path, monkeypatch
):
    real = SSLMetaArch.compute_loss
    calls = {"n": 0}
    poisoned = _poison("blocks.1.self_attn.v_proj")

    def second_step_poisoned(self, batch, teacher_temp):
        calls["n"] += 1
        return (poisoned if calls["n"] == 2 else real)(self, batch, teacher_temp)

    monkeypatch.setattr(SSLMetaArch, "compute_loss", second_step_poisoned)
    out = pretrain(_cfg(tiny_cfg, cohort, tmp_path / "a", "train.max_steps=3"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nan_steps"] == 1 and summary["steps"] == 3
    assert summary["nan_last"]["reason"] == "non-finite gradient"
    assert "blocks.1.self_attn.v_proj" in summary["nan_last"]["culprits"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [float(r["finite"]) for r in rows] == [1.0, 0.0, 1.0]

    monkeypatch.setattr(SSLMetaArch, "compute_loss", poisoned)
    cfg = _cfg(tiny_cfg, cohort, tmp_path / "b", "train.max_nan_steps=2")
    with pytest.raises(FloatingPointError) as err:
        pretrain(cfg)
    msg = str(err.value)
    assert "max_nan_steps=2" in msg and "non-finite gradient" in msg
    assert "dino_loss" in msg and "ibot_loss" in msg
    assert "backbone.blocks.1.self_attn.v_proj" in msg


def test_loss_stall_warns_when_the_loss_does_not_move(caplog):
    flat = LossStall(after=5, out_dim=1024, window=3)
    warned = [flat.check(s, 7.5 + 0.01 * (s % 2)) for s in range(1, 12)]
    assert sum(w is not None for w in warned) == 2 and flat.warnings == 2
    assert "log K = 6.931" in next(w for w in warned if w)
    falling = LossStall(after=5, out_dim=1024, window=3)
    assert all(falling.check(s, 8.0 / s) is None for s in range(1, 12))
    above_log_k = LossStall(after=5, out_dim=16, window=3)  # moved, but still above log 16
    assert any(above_log_k.check(s, 9.0 - 0.1 * s) for s in range(1, 12))


def test_knn_scores_against_brute_force(rng):
    n, c = 30, 3
    X = rng.standard_normal((n, 5))
    t = np.eye(c)[rng.integers(0, c, n)]
    groups = rng.integers(0, 12, n)
    got = knn_scores(X, t, groups, k=4, temperature=0.1)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    for i in range(n):
        others = [j for j in range(n) if groups[j] != groups[i]]
        sims = sorted(((Z[i] @ Z[j], j) for j in others), key=lambda p: -p[0])[:4]
        w = np.array([np.exp(s / 0.1) for s, _ in sims])
        want = sum(wi * t[j] for wi, (_, j) in zip(w, sims)) / w.sum()
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_monitor_and_random_init_at_step_zero(tiny_cfg, cohort, tmp_path):
    """The student's initial backbone is `random:OUT/teacher` of the run's seed, and the
    label monitor's step-0 value is the k-NN AUROC of `slidessl embed random:...`."""
    seed = 3
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_cfg,
        cohort,
        out,
        f"seed={seed}",
        "train.max_steps=4",
        f"monitor.eval_manifest={cohort}",
        "monitor.eval_task=tumor_high",
        "monitor.eval_every=2",
        "monitor.eval_k=3",
        "monitor.eval_max_tiles=150",
    )
    init = {}
    real_from_config = SSLMetaArch.from_config

    def spy(cfg_, feature_dim):
        arch = real_from_config(cfg_, feature_dim)
        init.update({k: v.clone() for k, v in arch.student["backbone"].state_dict().items()})
        return arch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SSLMetaArch, "from_config", staticmethod(spy))
        pretrain(cfg)
    rand, _ = build_embedder(f"random:{out / 'teacher'}", 16, seed=seed)
    for k, v in rand.state_dict().items():
        assert torch.equal(v, init[k]), k

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["knn_auroc"] != "" for r in rows] == [False, True, False, True]
    step0 = float(rows[0]["knn_auroc_init"])
    assert all(float(r["knn_auroc_init"]) == step0 for r in rows)
    for r in rows:  # (the first step's warm-up lr is 0: no update)
        assert 0.0 <= float(r["update_ratio"]) < 1.0 and 0.0 <= float(r["weight_dist"]) < 1.0
        assert np.isfinite(float(r["grad_norm"]))
    assert float(rows[-1]["update_ratio"]) > 0 and float(rows[-1]["weight_dist"]) > 0
    emb = tmp_path / "random.h5"
    argv = ["embed", f"random:{out / 'teacher'}", str(cohort), "--out", str(emb), "--pooling",
            "mean", "--seed", str(seed), "--max-tiles", "150"]  # fmt: skip
    assert cli_main(argv) == 0
    ids, X, _ = read_embeddings(emb)
    task = build_tasks(load_manifest(cohort), ["tumor_high"])[0]
    X = X[[ids.index(s) for s in task.slide_ids]]
    assert knn_auroc(X, task, k=3) == pytest.approx(step0, abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_monitor"]["init"] == pytest.approx(step0)
    assert summary["grad_norm_median"] is not None and summary["loss_stall_warnings"] == 0
