import yaml

from slidessl.cli import main


def test_print_config_applies_overrides(capsys):
    assert main(["pretrain", "dinov2_grid", "train.epochs=7", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["epochs"] == 7
    assert cfg["crops"]["layout"] == "compact"


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["pretrain", "demo", "train.epoks=3"]) == 2
    assert "train.epoks" in capsys.readouterr().err


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "pretrain",
            "demo",
            f"data.manifest={tmp_path / 'nope.csv'}",
            f"out={tmp_path / 'run'}",
            "train.progress=false",
        ]
    )
    assert code == 2  # bad input
    assert "nope.csv" in capsys.readouterr().err
