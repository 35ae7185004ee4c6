"""End-to-end: recipes run, resume is exact, NaN steps are skipped/counted, bad slides counted."""

import json
import shutil

import pytest
import torch

import slidessl
from slidessl.data.synthetic import make_cohort
from slidessl.ssl.meta import SSLMetaArch
from slidessl.train.checkpoint import latest_checkpoint, load_checkpoint
from slidessl.train.loop import pretrain


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, n_slides=6, seed=3, dim=16, min_tiles=80, max_tiles=200)


def _cfg(tiny_cfg, recipe, cohort, out, *extra):
    return tiny_cfg(recipe, f"data.manifest={cohort}", f"out={out}", "train.epochs=2", *extra)


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("dino", ["train.batch_size=2", "train.precision=bf16"]),
        ("dinov2", ["train.batch_size=2"]),
        ("dinov2_grid", ["train.batch_size=2", "train.accum_steps=2"]),
    ],
)
def test_recipe_runs_and_exports_teacher(recipe, extra, tiny_cfg, cohort, tmp_path):
    cfg = _cfg(tiny_cfg, recipe, cohort, tmp_path / "run", "train.max_steps=2", *extra)
    out = pretrain(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    assert all(v == v for v in summary["losses"])  # finite, not NaN
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "teacher_usage" in rows[0]
    enc = slidessl.load_encoder(out / "teacher")
    ckpt = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    teacher = {
        k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")
    }
    for name, value in enc.state_dict().items():
        assert torch.equal(value, teacher[name]), name
    if recipe != "dino":
        assert "ibot_loss" in summary["loss_terms_last"]


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tiny_cfg, cohort, tmp_path):
    extra = [
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "data.num_workers=1",
        "train.steps_per_epoch=2",
        "crops.feature_noise=0.1",
        "model.overrides.drop_path_rate=0.1",
    ]
    full = pretrain(_cfg(tiny_cfg, "dino", cohort, tmp_path / "full", *extra))
    part_cfg = _cfg(tiny_cfg, "dino", cohort, tmp_path / "part", *extra, "train.max_steps=3")
    pretrain(part_cfg)  # stops mid-epoch 2 (2 steps per epoch)
    resumed = pretrain(_cfg(tiny_cfg, "dino", cohort, tmp_path / "part", *extra), resume=True)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 4
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)
    sa = load_checkpoint(latest_checkpoint(full / "checkpoints"))
    sb = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    for part in ("student", "teacher"):
        for name, value in sa[part].items():
            assert torch.allclose(value, sb[part][name], atol=1e-6), (part, name)
    assert torch.allclose(sa["centers"]["dino"], sb["centers"]["dino"], atol=1e-6)
    csv_rows = (resumed / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 5  # header + 4 steps, no duplicates from the resumed part


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop(tiny_cfg, cohort, tmp_path, monkeypatch):
    real = SSLMetaArch.compute_loss
    calls = {"n": 0}

    def flaky(self, batch, teacher_temp):
        loss, logs = real(self, batch, teacher_temp)
        calls["n"] += 1
        if calls["n"] == 2:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(SSLMetaArch, "compute_loss", flaky)
    out = pretrain(
        _cfg(tiny_cfg, "dino", cohort, tmp_path / "a", "train.batch_size=2", "train.max_steps=3")
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nan_steps"] == 1 and summary["steps"] == 3

    def always_nan(self, batch, teacher_temp):
        loss, logs = real(self, batch, teacher_temp)
        return loss * float("inf"), logs

    monkeypatch.setattr(SSLMetaArch, "compute_loss", always_nan)
    cfg = _cfg(
        tiny_cfg, "dino", cohort, tmp_path / "b", "train.batch_size=2", "train.max_nan_steps=2"
    )
    with pytest.raises(FloatingPointError, match="max_nan_steps=2"):
        pretrain(cfg)


def test_bad_slide_is_skipped_and_counted(tiny_cfg, cohort, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(cohort.parent, root)
    victim = sorted((root / "slides").glob("*.h5"))[0]
    victim.write_bytes(b"this is not an HDF5 file")
    cfg = _cfg(
        tiny_cfg,
        "dino",
        root / "manifest.csv",
        tmp_path / "run",
        "train.max_steps=1",
        "train.batch_size=2",
        "data.on_bad_slide=skip",
    )
    with pytest.warns(UserWarning, match="skipping slide"):
        out = pretrain(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_bad_slides"] == 1
    assert victim.stem in summary["skipped_slides"][0]["slide_id"]


def test_progress_bar_in_a_log_file_is_throttled(tiny_cfg, cohort, tmp_path, capfd, monkeypatch):
    """stderr not a terminal: the per-step postfix must not force a redraw per step."""
    monkeypatch.setenv("SLIDESSL_PROGRESS_INTERVAL", "30")
    cfg = _cfg(
        tiny_cfg, "dino", cohort, tmp_path / "run", "train.max_steps=6", "train.progress=true"
    )
    pretrain(cfg)
    err = capfd.readouterr().err
    draws = err.count("pretrain:")
    assert 1 <= draws <= 3, err[-2000:]  # first draw, maybe one on the way, the final one
