"""docs/troubleshooting.md against the code: every message the page quotes is triggered here
through ``slidessl.cli.main`` and must appear, word for word, both on stderr and in the page
(page and code cannot drift apart); a quoted message no case triggers must be marked
"not triggered by the test" in the page."""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from slidessl.cli import main
from slidessl.data.synthetic import make_cohort

PAGE = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
NOT_TRIGGERED = "not triggered by the test"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 slides, 3 patients, 8-dim features, seeded."""
    root = tmp_path_factory.mktemp("troubleshooting")
    return make_cohort(root / "c", 3, seed=1, dim=8, min_tiles=200, max_tiles=220)


@pytest.fixture(scope="module")
def embeddings(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "meanpool.h5"
    assert main(["embed", "meanpool", str(cohort), "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def _keep_threads():
    """``main`` sizes torch's threads; give the rest of the session its own count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@dataclass
class Ctx:
    cohort: Path
    embeddings: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


def _rows(manifest: Path) -> list[dict]:
    """The cohort's manifest rows with absolute paths (so a copy may live anywhere)."""
    rows = list(csv.DictReader(manifest.open()))
    for r in rows:
        r["path"] = str((manifest.parent / r["path"]).resolve())
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _broken(ctx: Ctx, edit) -> Path:
    """A copy of the cohort whose first slide (sorted by name) is changed by ``edit``."""
    root = ctx.tmp / "broken"
    shutil.copytree(ctx.cohort.parent, root)
    victim = sorted((root / "slides").glob("*.h5"))[0]
    if callable(edit):
        with h5py.File(victim, "r+") as f:
            edit(f)
    else:
        victim.write_bytes(edit)
    return root / "manifest.csv"


def _set_coords(f, change) -> None:
    """Rewrite ``coords`` (as float64 when ``change`` makes NaN) keeping its attributes."""
    coords, attrs = change(f["coords"][:]), dict(f["coords"].attrs)
    del f["coords"]
    f["coords"] = coords
    for k, v in attrs.items():
        f["coords"].attrs[k] = v


def _nan_coords(c):
    c = c.astype(np.float64)
    c[0, 0] = np.nan
    return c


def _negative_coords(c):
    c[0, 0] = -512
    return c


def _repeated_coords(c):
    c[1] = c[0]
    return c


def _nan_feature(f):
    x = f["features"][:]
    x[3, 1] = np.nan
    f["features"][...] = x


def _other_dim(f):
    n = len(f["features"])
    del f["features"]
    f["features"] = np.zeros((n, 5), dtype=np.float32)


def _embed(ctx: Ctx, manifest: Path, *extra) -> list:
    return ["embed", "meanpool", manifest, "--out", ctx.tmp / "e.h5", *extra]


def _pretrain(ctx: Ctx, *overrides, manifest=None) -> list:
    m = ctx.cohort if manifest is None else manifest
    return ["pretrain", "dino+cpu", f"data.manifest={m}", f"out={ctx.tmp / 'run'}", *overrides]


SMALL_BATCH = ("train.batch_size=1", "train.accum_steps=1", "train.epochs=1")


def _case_missing_column(ctx):
    m = ctx.tmp / "m.csv"
    m.write_text("slide_id,file\nS1,S1.h5\n")
    return _pretrain(ctx, manifest=m)


def _case_empty(ctx):
    (ctx.tmp / "m.csv").write_text("")
    return ["inspect", ctx.tmp / "m.csv"]


def _case_no_rows(ctx):
    (ctx.tmp / "m.csv").write_text("slide_id,path,label\n")
    return ["inspect", ctx.tmp / "m.csv"]


def _case_duplicate_id(ctx):
    rows = _rows(ctx.cohort)
    return _embed(ctx, _write(ctx.tmp / "m.csv", [*rows, rows[0]]))


def _case_missing_file(ctx):
    rows = _rows(ctx.cohort)
    rows[0] = {**rows[0], "slide_id": "S1", "path": str(ctx.tmp / "slides" / "S1.h5")}
    return ["inspect", _write(ctx.tmp / "m.csv", rows)]


def _case_trained_embed_dim(ctx):
    from slidessl.models.encoder import build_encoder
    from slidessl.models.io import save_encoder

    torch.manual_seed(0)
    teacher = save_encoder(build_encoder("tiny", in_dim=8), ctx.tmp / "teacher")
    six = make_cohort(ctx.tmp / "c6", 2, seed=1, dim=6, min_tiles=200, max_tiles=220)
    return ["embed", teacher, six, "--out", ctx.tmp / "e.h5"]


def _case_resume(ctx):
    return _pretrain(ctx, *SMALL_BATCH, "--resume")


def _case_non_finite(ctx):
    from slidessl.ssl.meta import SSLMetaArch

    real = SSLMetaArch.compute_loss

    def infinite(self, batch, teacher_temp):
        loss, logs = real(self, batch, teacher_temp)
        return loss * float("inf"), logs

    ctx.monkeypatch.setattr(SSLMetaArch, "compute_loss", infinite)
    return _pretrain(ctx, *SMALL_BATCH, "train.max_nan_steps=1")


def _case_embed_options(ctx):
    argv = ["embed", "random", ctx.cohort, "--out", ctx.tmp / "r.h5"]
    assert main([str(a) for a in argv]) == 0  # pooling auto: mean
    return [*argv, "--pooling", "cls"]


def _case_survival(ctx, edit):
    rows = _rows(ctx.cohort)
    edit(rows)
    manifest = _write(ctx.tmp / "m.csv", rows)
    task = "os=surv:os_months:os_event"
    return ["probe", ctx.embeddings, manifest, "--task", task, "--out", ctx.tmp / "p"]


def _negative_time(rows):
    rows[0]["os_months"] = "-3"


def _two_follow_ups(rows):
    rows[1]["patient_id"] = rows[0]["patient_id"]
    rows[1]["os_months"] = str(float(rows[0]["os_months"]) + 1)


def _probe(ctx, task, *extra):
    return ["probe", ctx.embeddings, ctx.cohort, "--task", task, "--out", ctx.tmp / "p", *extra]


# (fragments quoted by the page, argv builder, exit status)
CASES = {
    "missing column": (
        ["1 problem(s):", "missing column 'path' (header: ['slide_id', 'file'])"],
        _case_missing_column,
        2,
    ),
    "empty manifest": (["empty manifest (no header line)"], _case_empty, 2),
    "no slides": (["no slides listed"], _case_no_rows, 2),
    "duplicate slide_id": (["duplicate slide_id 'syn-p0000-s0' (2 rows)"], _case_duplicate_id, 2),
    "missing slide file": (["missing file for 'S1': "], _case_missing_file, 2),
    "no manifest": (
        ["no such manifest file or folder"],
        lambda ctx: ["inspect", ctx.tmp / "nosuch.csv"],
        2,
    ),
    "no embeddings": (
        ["embeddings file does not exist"],
        lambda ctx: [
            "probe",
            ctx.tmp / "emb.h5",
            ctx.cohort,
            "--task",
            "tumor_high",
            "--out",
            ctx.tmp,
        ],
        2,
    ),
    "unreadable slide": (
        ["unreadable or truncated HDF5 file (Unable to synchronously open file"],
        lambda ctx: _embed(ctx, _broken(ctx, b"not an h5 file")),
        2,
    ),
    "no coords dataset": (
        ["missing dataset 'coords' (found: ["],
        lambda ctx: _embed(ctx, _broken(ctx, lambda f: f.__delitem__("coords"))),
        2,
    ),
    "NaN coords": (
        ["coords hold NaN/Inf"],
        lambda ctx: _embed(ctx, _broken(ctx, lambda f: _set_coords(f, _nan_coords))),
        2,
    ),
    "negative coords": (
        ["negative coordinates (1 tiles)"],
        lambda ctx: _embed(ctx, _broken(ctx, lambda f: _set_coords(f, _negative_coords))),
        2,
    ),
    "repeated coords": (
        ["duplicate coordinates: 1 tiles repeat a position (e.g. ("],
        lambda ctx: _embed(ctx, _broken(ctx, lambda f: _set_coords(f, _repeated_coords))),
        2,
    ),
    "cohort feature dim": (
        ["feature dim 5 differs from the dataset's 8"],
        lambda ctx: _embed(ctx, _broken(ctx, _other_dim)),
        2,
    ),
    "encoder feature dim": (
        ["tile features have dim 6, the encoder expects 8"],
        _case_trained_embed_dim,
        2,
    ),
    "NaN features": (
        ["rows read hold NaN/Inf features (open with nan_policy='drop' to drop such rows)"],
        lambda ctx: _embed(ctx, _broken(ctx, _nan_feature)),
        2,
    ),
    "unknown recipe": (
        ["nosuchrecipe: no such config file (shipped recipes: cpu, cpu_longrange, default, demo"],
        lambda ctx: ["pretrain", "nosuchrecipe"],
        2,
    ),
    "manifest not set": (
        ["data.manifest is not set: pass data.manifest=PATH (CSV or folder)"],
        lambda ctx: ["pretrain", "dino+cpu", f"out={ctx.tmp / 'run'}"],
        2,
    ),
    "manifest not there": (
        ["nosuch.csv: no such file or folder (set data.manifest=PATH"],
        lambda ctx: _pretrain(ctx, manifest=ctx.tmp / "nosuch.csv"),
        2,
    ),
    "unknown key": (
        ["override 'train.epoch=1': unknown config key 'train.epoch'"],
        lambda ctx: _pretrain(ctx, "train.epoch=1"),
        2,
    ),
    "wrong type": (
        ["config key 'train.epochs': Value 'abc' of type 'str' could not be converted to Integer"],
        lambda ctx: _pretrain(ctx, "train.epochs=abc"),
        2,
    ),
    "no value": (
        ["override 'train.epochs': expected key=value, e.g. train.epochs=3"],
        lambda ctx: _pretrain(ctx, "train.epochs"),
        2,
    ),
    "batch too large": (
        ["3 slides cannot fill one global batch of 8"],
        lambda ctx: _pretrain(ctx),
        2,
    ),
    "memory": (
        ["pretrain: a step needs an estimated", "train.memory_check=warn runs anyway."],
        lambda ctx: _pretrain(ctx, *SMALL_BATCH, "train.memory_budget_gb=0.001"),
        2,
    ),
    "non-finite steps": (
        [
            "optimizer steps were skipped (steps [",
            "Lower optim.lr, raise optim.warmup_epochs, use train.precision=fp32 or check the "
            "input features for NaN/Inf.",
        ],
        _case_non_finite,
        1,
    ),
    "resume": (["--resume: no checkpoint in "], _case_resume, 2),
    "encoder spec": (
        ["nosuch_encoder: no such encoder (expected a teacher folder, checkpoint, meanpool"],
        lambda ctx: ["embed", "nosuch_encoder", ctx.cohort, "--out", ctx.tmp / "e.h5"],
        2,
    ),
    "prototype K": (
        ["'prototypes:x': K must be an integer, got 'x'"],
        lambda ctx: ["embed", "prototypes:x", ctx.cohort, "--out", ctx.tmp / "e.h5"],
        2,
    ),
    "pooling": (
        ["unknown pooling 'avg'; use cls, mean, pooled"],
        lambda ctx: _embed(ctx, ctx.cohort, "--pooling", "avg"),
        2,
    ),
    "embeddings options": (
        ["this run has 'cls'; its vectors would differ: write to a new file"],
        _case_embed_options,
        2,
    ),
    "probe column": (
        ["no label column ['nosuch'] (columns: ['tumor_high', 'infiltrated', "],
        lambda ctx: _probe(ctx, "nosuch"),
        2,
    ),
    "retrieve column": (
        ["no label column 'nosuch'"],
        lambda ctx: ["retrieve", ctx.embeddings, ctx.cohort, "--label", "nosuch", "--out", ctx.tmp],
        2,
    ),
    "survival time": (
        [
            "task 'os': row 2 (slide 'syn-p0000-s0'): time os_months='-3' must be a finite number "
            ">= 0"
        ],
        lambda ctx: _case_survival(ctx, _negative_time),
        2,
    ),  # fmt: skip
    "survival per patient": (
        ["task 'os': patient 'syn-p0000' has slides with different survival"],
        lambda ctx: _case_survival(ctx, _two_follow_ups),
        2,
    ),
    "folds": (
        ["task 'tumor_high': 3 patients cannot fill 10 folds"],
        lambda ctx: _probe(ctx, "tumor_high"),
        2,
    ),
    "required option": (
        ["slidessl abmil: error: the following arguments are required: --folds"],
        lambda ctx: ["abmil", ctx.cohort, "--task", "tumor_high", "--out", ctx.tmp],
        2,
    ),
}


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


@pytest.mark.parametrize("name", list(CASES))
def test_each_quoted_message_is_what_the_cli_prints(
    name, cohort, embeddings, tmp_path, monkeypatch, capsys
):
    fragments, build, status = CASES[name]
    argv = build(Ctx(cohort, embeddings, tmp_path, monkeypatch))
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err
    assert code == status, (name, code, err)
    assert "Traceback" not in err
    page = PAGE.read_text()
    for fragment in fragments:
        assert fragment in err, (name, fragment, err)
        assert fragment in page, (name, fragment)


def _error_sections() -> dict[str, str]:
    text = PAGE.read_text()
    body = text.split("\n## Error messages\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### (.+)$", body, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_quoted_message_in_the_page_is_triggered_or_marked():
    fragments = [f for frags, _, _ in CASES.values() for f in frags]
    sections = _error_sections()
    assert len(sections) >= 12
    for title, text in sections.items():
        blocks = re.findall(r"^```\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        lines = [ln for b in blocks for ln in b.splitlines() if ln.strip()]
        assert lines, title  # every entry quotes its message(s)
        assert all(ln.startswith(("slidessl ", "  ")) for ln in lines), title
        untriggered = [ln for ln in lines if not any(f in ln for f in fragments)]
        assert len(untriggered) < len(lines), title  # at least one message is triggered
        if untriggered:
            assert NOT_TRIGGERED in text, (title, untriggered)
        assert "**What it means.**" in text and "**What to do.**" in text, title


def test_exit_statuses_of_the_page(cohort, tmp_path, monkeypatch, capsys):
    page = PAGE.read_text()
    for status in ("| 0 |", "| 2 |", "| 1 |", "| 130 |"):
        assert status in page
    # inspect: a slide that fails its checks is bad input (2), listed on stdout
    broken = _broken(Ctx(cohort, cohort, tmp_path, monkeypatch), b"not an h5 file")
    capsys.readouterr()
    assert _run(["inspect", broken]) == 2
    out = capsys.readouterr().out
    assert "ERROR" in out and "unreadable or truncated HDF5 file" in out
    assert "(2 ok, 1 with errors)" in out
    # Ctrl-C: 130 and one word
    import slidessl.eval.report as report

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "make_report", interrupted)
    assert _run(["report", tmp_path]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
