import json

import h5py
import numpy as np

from slidessl.cli import main
from slidessl.data.inspect import inspect_path


def test_synth_then_inspect_cli(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--slides",
            "5",
            "--seed",
            "7",
            "--dim",
            "8",
            "--min-tiles",
            "200",
            "--max-tiles",
            "400",
        ]
    )
    assert rc == 0 and (out / "manifest.csv").is_file()
    assert len(list((out / "slides").glob("*.h5"))) == 5
    capsys.readouterr()
    rc = main(["inspect", str(out / "manifest.csv"), "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "slides: 5 (5 ok, 0 with errors)" in text
    assert "label infiltrated:" in text and "stride sources: {'attribute': 5}" in text
    reports = json.loads((tmp_path / "r.json").read_text())
    assert len(reports) == 5 and all(r["ok"] and r["dim"] == 8 for r in reports)
    assert all(r["stride_source"] == "attribute" and 0 < r["fill"] <= 1 for r in reports)


def test_inspect_flags_bad_slides_and_exits_nonzero(tmp_path, slide_factory, capsys, rng):
    good, *_ = slide_factory(n=50, dim=6, name="good")
    nan, *_ = slide_factory(n=50, dim=6, name="nan")
    with h5py.File(nan, "a") as f:
        feats = f["features"][()]
        feats[int(rng.integers(50)), 2] = np.nan
        f["features"][...] = feats
    wide, *_ = slide_factory(n=50, dim=9, name="wide")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    (tmp_path / "m.csv").write_text(
        "slide_id,path\n" + "".join(f"{p.stem},{p.name}\n" for p in (good, nan, wide, broken))
    )
    rc = main(["inspect", str(tmp_path / "m.csv")])
    text = capsys.readouterr().out
    assert rc == 2  # a slide that fails its checks is bad input
    assert "1 of 50 tiles hold NaN/Inf" in text
    assert "feature dim 9 differs from the dataset's 6" in text
    assert "unreadable or truncated HDF5" in text
    assert "slides: 4 (1 ok, 3 with errors)" in text


def test_inspect_single_file_and_notes(tmp_path, layouts, rng, capsys):
    grid = layouts.random_grid(rng, 40, 12)
    path = layouts.clam(tmp_path / "x.h5", rng.standard_normal((40, 4)), grid * 128)
    reports, manifest = inspect_path(path)
    assert manifest is None and reports[0].ok
    assert any("inferred" in n for n in reports[0].notes)
    assert main(["inspect", str(path), "--stride", "32"]) == 0  # true stride is 128
    assert "multiples of" in capsys.readouterr().out


def test_inspect_unreadable_manifest_exit_2(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("slide_id,path\na,missing.h5\n")
    assert main(["inspect", str(tmp_path / "m.csv")]) == 2
    assert "missing file" in capsys.readouterr().err


def test_synth_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--slides", "0"]) == 2
    assert "n_slides" in capsys.readouterr().err


def test_inspect_refuses_an_off_grid_file_and_shows_no_made_up_facts(tmp_path, layouts, rng):
    """Coordinates jittered off a 256-px grid, no patch_size_level0: an error naming the fix
    (not a note, not ok), exit 2, and no '0 tiles, dim 0' for the facts it never read."""
    grid = layouts.random_grid(rng, 300, 48)
    coords = grid * 256 + 4096 + rng.integers(-100, 101, size=grid.shape)
    path = layouts.clam(tmp_path / "jitter.h5", rng.standard_normal((300, 4)), coords)
    code = main(["inspect", str(path)])
    assert code == 2
    (report,), _ = inspect_path(path)
    assert not report.ok and "`stride` column" in report.errors[0]
    from slidessl.data.inspect import format_reports

    row = format_reports([report], None).splitlines()[1]
    assert "ERROR" in row and " 0 " not in row and row.split()[2] == "-"
