import subprocess
import sys

from slidessl.cli import build_parser, main
from slidessl.data.synthetic import make_cohort


def test_every_layer_registers_its_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    expected = {
        "synth",
        "inspect",
        "bench",
        "pretrain",
        "embed",
        "probe",
        "abmil",
        "retrieve",
        "report",
        "demo",
    }
    assert expected <= set(sub.choices)


def test_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "m.csv"
    empty.write_text("slide_id,path,y\n")
    code = main(["probe", "e.h5", str(empty), "--task", "y", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and str(empty) in err and "no slides" in err and "Traceback" not in err

    manifest = make_cohort(tmp_path / "c", 3, seed=1, dim=8, min_tiles=200, max_tiles=220)
    missing = tmp_path / "no_such_embeddings.h5"
    code = main(
        ["probe", str(missing), str(manifest), "--task", "tumor_high", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "slidessl", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("slidessl ")
