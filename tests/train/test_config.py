import json

import pytest
import yaml

from slidessl.train.config import CONFIG_DIR, ConfigError, load_config


def test_recipe_overrides_default_and_dotted_overrides_parse_yaml():
    cfg = load_config("dino", ["train.epochs=3", "optim.betas=[0.8, 0.9]", "data.manifest=null"])
    assert cfg["train"]["epochs"] == 3
    assert cfg["optim"]["betas"] == [0.8, 0.9]
    assert cfg["data"]["manifest"] is None
    assert cfg["crops"]["layout"] == "original"  # from the recipe
    assert cfg["optim"]["eps"] == 1.0e-8  # from default.yaml
    assert cfg["_meta"]["overrides"][0] == "train.epochs=3"


def test_recipe_base_chain_is_merged():
    grid = load_config("dinov2_grid")
    assert grid["crops"]["layout"] == "compact"
    assert grid["ibot"]["loss_weight"] == 1.0  # inherited from dinov2.yaml
    assert grid["train"]["accum_steps"] > 1
    assert grid["crops"]["n_local"] == 8  # inherited from dino.yaml


@pytest.mark.parametrize("override", ["train.epoch=3", "nope=1", "optim.lr.x=1"])
def test_unknown_keys_are_errors_naming_the_key(override):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert override.split("=")[0].split(".")[0] in str(err.value)


def test_unknown_key_in_recipe_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"batchsize": 3}}))
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.batchsize"):
        load_config(bad)


def test_free_form_sections_accept_new_keys():
    cfg = load_config("demo", ["model.overrides.depth=1", "crops.n_local=3"])
    assert cfg["model"]["overrides"]["depth"] == 1
    assert cfg["model"]["overrides"]["attention"] == "dense"  # kept from the recipe
    assert cfg["crops"]["n_local"] == 3


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.precision=fp16", "precision"),
        ("train.batch_size=0", "batch_size"),
        ("dino.centering=none", "centering"),
        ("noequals", "key=value"),
        # mistyped values: one error naming the key (the schema's types)
        ("train.epochs=abc", r"override 'train.epochs=abc'.*train.epochs.*Integer"),
        ("train.grad_checkpointing=[1]", "train.grad_checkpointing"),
        ("crops.n_lokal=3", "unknown config key 'crops.n_lokal'"),
        ("optim.betas=0.9", "optim.betas"),
        ("crops.n_global=0", "n_global"),
        # the encoder options are typed by EncoderConfig
        ("model.overrides.depht=2", "unknown config key 'model.overrides.depht'"),
        ("model.overrides.depth=abc", r"model.overrides.depth.*Integer"),
        ("model.overrides.attention=sparse", r"model.overrides.attention.*dilated, dense"),
        ("model.overrides.segments=abc", "model.overrides.segments"),
        ("model.name=huge", "model.name must be one of"),
    ],
)
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", [override])


def test_model_overrides_hold_the_set_options_as_plain_values():
    cfg = load_config("dino+cpu", ["model.overrides.segments=[64,128]"])
    over = cfg["model"]["overrides"]
    assert over["attention"] == "dense" and type(over["attention"]) is str
    assert over["segments"] == [64, 128] and "depth" not in over and None not in over.values()


def test_missing_file_lists_shipped_recipes(tmp_path):
    with pytest.raises(ConfigError, match="dinov2_grid"):
        load_config(tmp_path / "missing.yaml")


def test_all_shipped_recipes_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"default", "dino", "dinov2", "dinov2_grid", "demo"} <= set(names)
    for name in names:
        assert load_config(name)["train"]["epochs"] >= 1


def test_recipes_join_with_plus():
    cfg = load_config("dinov2+cpu")
    assert cfg["ibot"]["loss_weight"] == 1.0  # from dinov2
    assert cfg["model"]["name"] == "tiny"  # from the cpu sizes, merged over the recipe
    assert cfg["model"]["overrides"]["local_depth"] >= 1  # dinov2's own overrides kept
    assert "cpu.yaml" in cfg["_meta"]["recipe"] and "dinov2.yaml" in cfg["_meta"]["recipe"]
    with pytest.raises(ConfigError, match="nope"):
        load_config("dinov2+nope")


def test_values_arrive_with_the_schema_types():
    cfg = load_config("demo", ["train.epochs='3'", "optim.lr=1", "train.memory_budget_gb=4"])
    assert cfg["train"]["epochs"] == 3 and isinstance(cfg["train"]["epochs"], int)
    assert isinstance(cfg["optim"]["lr"], float) and cfg["optim"]["lr"] == 1.0
    assert isinstance(cfg["train"]["memory_budget_gb"], float)
    assert cfg["crops"]["n_global"] == 2 and "mask_min_block_tiles" in cfg["crops"]  # typed


def test_dumped_config_reloads_to_the_same_values(tmp_path):
    from slidessl.train.config import dump_config

    cfg = load_config("dinov2_grid", ["train.epochs=2"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = yaml.safe_load((tmp_path / "config.yaml").read_text())
    meta = again.pop("_meta")
    assert meta["overrides"] == ["train.epochs=2"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(again))
    reloaded = load_config(tmp_path / "run.yaml")
    reloaded.pop("_meta"), cfg.pop("_meta")
    assert json.loads(json.dumps(reloaded)) == json.loads(json.dumps(cfg))  # tuples as lists
