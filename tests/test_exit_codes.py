"""Every subcommand's bad-input path: one line on stderr naming the problem, exit status 2,
no traceback; ``-v`` anywhere on the command line shows the traceback instead."""

import pytest

from slidessl.cli import main


@pytest.fixture
def paths(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("slide_id,path,y\n")
    return {"missing": str(tmp_path / "no_such_manifest.csv"), "empty": str(empty),
            "out": str(tmp_path / "out"), "tmp": tmp_path}  # fmt: skip


CASES = {
    "synth": (lambda p: ["synth", "--out", p["out"], "--slides", "0"], "slides"),
    "inspect": (lambda p: ["inspect", p["missing"]], "no_such_manifest.csv"),
    "bench": (lambda p: ["bench", "attention", "--device", "cuda"], "CUDA"),
    "pretrain": (
        lambda p: ["pretrain", "dino+cpu", f"data.manifest={p['missing']}", f"out={p['out']}"],
        "no_such_manifest.csv",
    ),
    "pretrain-no-manifest": (
        lambda p: ["pretrain", "dino+cpu", f"out={p['out']}"],
        "data.manifest is not set",
    ),
    "embed": (
        lambda p: ["embed", "meanpool", p["missing"], "--out", p["out"] + ".h5"],
        "no_such_manifest.csv",
    ),  # fmt: skip
    "probe": (
        lambda p: ["probe", "e.h5", p["empty"], "--task", "y", "--out", p["out"]],
        "no slides",
    ),  # fmt: skip
    "abmil": (
        lambda p: [
            "abmil",
            p["missing"],
            "--task",
            "y",
            "--folds",
            p["out"] + ".json",
            "--out",
            p["out"],
        ],  # fmt: skip
        "no_such_manifest.csv",
    ),
    "retrieve": (
        lambda p: ["retrieve", "e.h5", p["missing"], "--label", "y", "--out", p["out"]],
        "e.h5: embeddings file does not exist",
    ),  # fmt: skip
    "report": (lambda p: ["report", str(p["tmp"] / "no_run")], "no_run"),
    "diagnose": (
        lambda p: ["diagnose", "meanpool", p["missing"], "--task", "y", "--out", p["out"]],
        "no_such_manifest.csv",
    ),
    "demo": (
        lambda p: ["demo", "--out", p["out"], "--manifest", p["missing"]],
        "no_such_manifest.csv",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(case, paths, capsys):
    argv, needle = CASES[case]
    code = main(argv(paths))
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    assert needle in err and "Traceback" not in err, err


def test_pretrain_writes_nothing_before_config_and_data_are_checked(paths):
    assert main(["pretrain", "dino+cpu", f"data.manifest={paths['missing']}",
                 f"out={paths['out']}"]) == 2  # fmt: skip
    assert not (paths["tmp"] / "out").exists()


@pytest.mark.parametrize("where", ["first", "after the subcommand", "last"])
def test_verbose_anywhere_shows_the_traceback(where, paths):
    argv = ["embed", "meanpool", paths["missing"], "--out", paths["out"] + ".h5"]
    argv = {"first": ["-v", *argv], "after the subcommand": [argv[0], "-v", *argv[1:]],
            "last": [*argv, "--verbose"]}[where]  # fmt: skip
    with pytest.raises((OSError, ValueError)):
        main(argv)
