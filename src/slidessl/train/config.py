"""Configuration: ``configs/default.yaml`` merged with a recipe, then dotted overrides.

The layering is facebookresearch/dinov2's (``ssl_default_config.yaml`` + a recipe +
``key=value`` command-line options), with OmegaConf:

1. :class:`slidessl.train.schema.PretrainConfig` types every section; ``default.yaml``
   (shipped inside the package) gives every key its documented default.
2. The recipe YAML (``dino.yaml``, ``dinov2.yaml``, ...) changes some of them. A recipe may
   name a parent recipe with ``base: other.yaml`` (resolved next to it), or several,
   ``base: [dinov2.yaml, cpu.yaml]``, applied in order; ``load_config("dinov2+cpu")`` does
   the same from the command line.
3. Overrides ``a.b.c=value`` from the command line; values are parsed as YAML, so
   ``train.epochs=3``, ``optim.betas=[0.9,0.95]`` and ``data.manifest=null`` all work.

The merged config is in struct mode: a key that the schema does not have, or a value that
cannot take the key's type (``train.epochs=abc``), is one :class:`ConfigError` naming the
key and the file or override it came from, so a typo never trains silently with a default.
``model.overrides`` is typed by :class:`slidessl.models.presets.EncoderConfig` (through
:class:`slidessl.train.schema.EncoderOverrides`) and holds only the options a recipe or an
override sets; the preset gives the rest. :func:`load_config` returns plain Python
containers (dicts, lists, tuples) of checked types, choices as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from slidessl.data.views import MultiCropConfig
from slidessl.models.presets import PRESETS
from slidessl.train.schema import PretrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "dump_config",
    "load_config",
    "resolve_recipe",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def resolve_recipe(name: str | Path) -> Path:
    """Find a recipe: an existing path, or a name of a shipped recipe (``dino``, ``demo.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{name}: no such config file (shipped recipes: {', '.join(shipped)})")


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(PretrainConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _merge(cfg: DictConfig, update: dict, source: str) -> DictConfig:
    """Merge ``update`` into ``cfg``; any schema violation is a ConfigError naming the key."""
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        if isinstance(exc, ConfigKeyError):
            raise ConfigError(f"{source}: unknown config key '{key}'") from None
        msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        raise ConfigError(f"{source}: config key '{key}': {msg}") from None


def _override(item: str) -> dict:
    """``a.b.c=value`` (value parsed as YAML) -> ``{"a": {"b": {"c": value}}}``."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.epochs=3")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _load_recipe(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: recipe 'base' chain loops back on itself")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    chain: list[tuple[Path, dict]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        parent = Path(base)
        if not parent.is_absolute():
            parent = path.parent / parent
        if not parent.is_file():
            raise ConfigError(f"{path}: base recipe '{base}' not found")
        chain += _load_recipe(parent, (*seen, path))
    chain.append((path, data))
    return chain


def _recipe_names(path) -> list:
    """``"dinov2+cpu"`` (not an existing file) -> ``["dinov2", "cpu"]``: recipes applied in
    order, each with its ``base`` chain."""
    if isinstance(path, (list, tuple)):
        return list(path)
    if isinstance(path, str) and "+" in path and not Path(path).is_file():
        return [p for p in path.split("+") if p]
    return [path]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Return the merged, type-checked config: default, then recipe ``path``, then
    ``overrides``, as plain Python containers.

    ``path`` may join recipes with ``+`` (``"dinov2+cpu"``: the ``cpu`` sizes over the
    ``dinov2`` recipe). ``cfg["_meta"]`` records the recipe files and the overrides (saved
    with each run).
    """
    cfg = _merge(_schema(), _read_yaml(DEFAULT_CONFIG), str(DEFAULT_CONFIG))
    recipe_file = None
    if path is not None:
        files = [resolve_recipe(name) for name in _recipe_names(path)]
        recipe_file = "+".join(str(f) for f in files)
        for f in files:
            if f.resolve() == DEFAULT_CONFIG.resolve():
                continue
            for source, data in _load_recipe(f):
                cfg = _merge(cfg, data, str(source))
    for item in overrides or []:
        cfg = _merge(cfg, _override(item), f"override '{item}'")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{DEFAULT_CONFIG}: no value for config key(s) {missing}")
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = out["model"]
    model["overrides"] = {k: v for k, v in model["overrides"].items() if v is not None}
    validate(out)
    out["_meta"] = {
        "recipe": recipe_file,
        "overrides": list(overrides or []),
    }
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: dict) -> None:
    """Check value ranges that would otherwise fail deep inside training (types are the
    schema's business and are already checked)."""
    t, o, tea = cfg["train"], cfg["optim"], cfg["teacher"]
    for key in ("batch_size", "accum_steps", "epochs"):
        _require(t[key] >= 1, f"train.{key} must be >= 1, got {t[key]}")
    choices = {
        "train.precision": ("fp32", "bf16"),
        "train.memory_check": ("error", "warn", "off"),
        "dino.centering": ("centering", "sinkhorn_knopp"),
        "data.on_bad_slide": ("error", "skip"),
        "distributed.strategy": ("ddp", "fsdp"),
    }
    for dotted, allowed in choices.items():
        section, key = dotted.split(".")
        value = cfg[section][key]
        _require(value in allowed, f"{dotted} must be one of {list(allowed)}, got {value!r}")
    _require(o["lr"] >= 0, f"optim.lr must be >= 0, got {o['lr']}")
    _require(0 < o["layer_decay"] <= 1, "optim.layer_decay must be in (0, 1]")
    _require(
        0 <= tea["momentum"] <= 1 and 0 <= tea["momentum_end"] <= 1,
        "teacher.momentum and teacher.momentum_end must be in [0, 1]",
    )
    try:
        MultiCropConfig.from_dict(cfg["crops"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    name = cfg["model"]["name"]
    _require(name in PRESETS, f"model.name must be one of {sorted(PRESETS)}, got {name!r}")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: dict, path: Path) -> None:
    """Write the resolved config (what actually ran) as YAML (tuples as lists)."""
    path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
