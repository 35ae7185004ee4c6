import argparse
import re
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


def _subcommands(parser, prefix=()):
    """``(("bench", "encoder"), parser)`` for every registered subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_help_has_a_description_and_helps_every_argument():
    found = dict(_subcommands(build_parser()))
    assert len(found) >= 13 and ("bench", "attention") in found and ("bench", "encoder") in found
    for path, parser in found.items():
        name = " ".join(path)
        text = " ".join(parser.format_help().split())
        desc = parser.description or ""
        assert re.search(r"[A-Z][^.]{20,}[.;:] ", desc), name  # at least one sentence
        assert f"Example: slidessl {name}" in desc, name  # and one command line
        assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (name, action.dest)
            if isinstance(action.default, int) and not isinstance(action.default, bool):
                # the formatter shows defaults: no hand-written duplicate like "(8192)"
                assert f"({action.default})" not in action.help, (name, action.dest)
                assert f"default {action.default}" not in action.help, (name, action.dest)
                assert f"(default: {action.default})" in text, (name, action.dest)
    assert "(default: auto)" in " ".join(found[("embed",)].format_help().split())


def _help(parser, dest):
    return next(a.help for a in parser._actions if a.dest == dest)


def test_help_states_the_facts_a_newcomer_needs():
    top = build_parser()
    assert "-v/--verbose may be given anywhere" in top.description
    assert "exit status 2" in top.description
    sub = dict(_subcommands(top))
    embed = sub[("embed",)]
    encoder = _help(embed, "encoder")
    for spec in ("meanpool", "random:PATH", "gigapath:PATH", "prototypes[:K", "cooc[:K"):
        assert spec in encoder, spec
    pooling = _help(embed, "pooling")
    for choice in ("cls", "mean", "pooled", "layers:I,J", "regions:S[,S2"):
        assert choice in pooling, choice
    assert "the README and the demo use" in pooling
    for cmd in ("probe", "abmil"):
        assert "the demo uses 5" in _help(sub[(cmd,)], "k"), cmd
    assert "optional" in _help(sub[("probe",)], "folds")
    assert "required" in _help(sub[("abmil",)], "folds")
    folds = next(a for a in sub[("abmil",)]._actions if a.dest == "folds")
    assert folds.required
    config = _help(sub[("pretrain",)], "config")
    for name in ("dino", "dinov2", "dinov2_grid", "demo", "RECIPE+cpu", "RECIPE+cpu_longrange"):
        assert name in config, name
    assert "data.manifest=PATH is required" in sub[("pretrain",)].description
    assert "-v (anywhere on the command line) shows the traceback" in (
        sub[("pretrain",)].description
    )
