"""Embedding is a pure function of (encoder, slide file, options): a run killed mid-file and
resumed gives the uninterrupted vectors bit for bit (capped slides included), a file refuses
to resume under options that change a vector, maps are kept per slide, and the cheap
baselines read every tile."""

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from slidessl.cli import main
from slidessl.data.synthetic import make_cohort, write_trident_h5
from slidessl.eval.embed import maps_path, run_embed
from slidessl.eval.embed_io import read_embeddings
from slidessl.eval.maps import read_maps


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    # 300-400 tiles per slide, read with --max-tiles 120: every slide is capped
    return make_cohort(root, 10, seed=5, dim=8, min_tiles=300, max_tiles=400)


def _vectors(path):
    ids, X, attrs = read_embeddings(path)
    return dict(zip(ids, X)), attrs


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from slidessl.eval import embed_io
    from slidessl.eval.embed import run_embed

    real = embed_io.EmbeddingWriter.write
    calls = []

    def write_then_die(self, ids, vecs):
        real(self, ids, vecs)
        calls.append(ids)
        if len(calls) == 2:  # two batches on disk, then a hard kill mid-file
            os.kill(os.getpid(), signal.SIGKILL)

    embed_io.EmbeddingWriter.write = write_then_die
    run_embed("random", sys.argv[1], sys.argv[2], pooling="mean", max_tiles=120,
              batch_size=2, seed=3, progress=False, maps=3)
    """
)


def test_killed_then_resumed_equals_uninterrupted(cohort, tmp_path):
    whole = tmp_path / "whole.h5"
    run_embed("random", cohort, whole, "mean", max_tiles=120, batch_size=2, seed=3,
              progress=False, maps=3)  # fmt: skip
    resumed = tmp_path / "resumed.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cohort), str(resumed)])
    assert proc.returncode == -9  # really killed
    partial, _ = _vectors(resumed)
    assert len(partial) == 4  # two batches of two
    s = run_embed("random", cohort, resumed, "mean", max_tiles=120, batch_size=2, seed=3,
                  progress=False, maps=3)  # fmt: skip
    assert s["skipped_existing"] == 4 and s["written"] == 6
    a, attrs = _vectors(whole)
    b, attrs_b = _vectors(resumed)
    assert a.keys() == b.keys() and len(a) == 10
    for sid in a:  # bit for bit, although every slide is a capped subsample
        assert np.array_equal(a[sid], b[sid]), sid
    assert attrs["capped_slides"] == attrs_b["capped_slides"] == 10
    assert attrs["max_tiles"] == 120 and attrs["seed"] == 3 and attrs["order"] == "hilbert"
    # the same three slides' maps, whichever run wrote them
    ma = {m["slide_id"]: m for m in read_maps(maps_path(whole))}
    mb = {m["slide_id"]: m for m in read_maps(maps_path(resumed))}
    assert ma.keys() == mb.keys() and len(ma) == 3
    for sid in ma:
        np.testing.assert_array_equal(ma[sid]["attention"], mb[sid]["attention"])


def test_a_slide_vector_does_not_depend_on_its_position(cohort, tmp_path):
    """The capped subsample is keyed by slide id: the same slide in a one-slide manifest
    and in the whole cohort gets the same vector."""
    import csv

    rows = list(csv.DictReader(cohort.open()))
    one = tmp_path / "one.csv"
    with one.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow({**rows[-1], "path": str(cohort.parent / rows[-1]["path"])})
    run_embed("random", cohort, tmp_path / "all.h5", "mean", max_tiles=120, seed=3, progress=False)
    run_embed("random", one, tmp_path / "one.h5", "mean", max_tiles=120, seed=3, progress=False)
    a, _ = _vectors(tmp_path / "all.h5")
    b, _ = _vectors(tmp_path / "one.h5")
    sid = rows[-1]["slide_id"]
    assert list(b) == [sid] and np.array_equal(a[sid], b[sid])


@pytest.mark.parametrize(
    "change,key",
    [(["--max-tiles", "60"], "max_tiles"), (["--seed", "4"], "seed"),
     (["--pooling", "cls"], "pooling")],
)  # fmt: skip
def test_resume_under_other_options_is_refused(cohort, tmp_path, capsys, change, key):
    out = tmp_path / "e.h5"
    base = ["embed", "random", str(cohort), "--out", str(out), "--pooling", "mean"]
    assert main([*base, "--max-tiles", "120", "--seed", "3"]) == 0
    capsys.readouterr()
    args = {"--max-tiles": "120", "--seed": "3", **dict(zip(change[::2], change[1::2]))}
    code = main([*base, *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and f"{key}=" in err and "new file" in err


def test_meanpool_reads_every_tile_by_default(tmp_path):
    rng = np.random.default_rng(60000)
    n, side = 60000, 245
    coords = np.stack(np.unravel_index(np.arange(n), (side, side)), 1)[:, ::-1] * 256
    feats = rng.standard_normal((n, 4)).astype(np.float32) + np.linspace(0, 1, n)[:, None]
    write_trident_h5(tmp_path / "big.h5", feats, coords, {"patch_size_level0": 256})
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\nbig,{tmp_path / 'big.h5'}\n")
    out = tmp_path / "mean.h5"
    assert main(["embed", "meanpool", str(manifest), "--out", str(out)]) == 0
    got, attrs = _vectors(out)
    np.testing.assert_allclose(got["big"], feats.astype(np.float64).mean(0), rtol=0, atol=1e-6)
    assert attrs["max_tiles"] == -1 and attrs["capped_slides"] == 0
    assert attrs["pooling"] == "none"  # nothing to pool: not the encoders' default
    with h5py.File(out) as f:
        assert f.attrs["encoder_digest"] == "meanpool"


def test_default_pooling_is_the_token_mean_the_recipes_are_read_with(cohort, tmp_path):
    out = tmp_path / "r.h5"
    assert main(["embed", "random", str(cohort), "--out", str(out), "--max-tiles", "120"]) == 0
    _, attrs = _vectors(out)
    assert attrs["pooling"] == "mean" and attrs["max_tiles"] == 120
