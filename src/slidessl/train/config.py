"""Configuration: ``configs/default.yaml`` merged with a recipe, then dotted overrides.

The layering follows facebookresearch/dinov2 (``ssl_default_config.yaml`` + a recipe +
``key=value`` command-line options), written with plain dicts:

1. ``default.yaml`` (shipped inside the package) defines every key and its default.
2. The recipe YAML (``dino.yaml``, ``dinov2.yaml``, ...) changes some of them. A recipe may
   name a parent recipe with ``base: other.yaml`` (resolved next to it), or several,
   ``base: [dinov2.yaml, cpu.yaml]``, applied in order; ``load_config("dinov2+cpu")`` does
   the same from the command line.
3. Overrides ``a.b.c=value`` from the command line; values are parsed as YAML, so
   ``train.epochs=3``, ``optim.betas=[0.9,0.95]`` and ``data.manifest=null`` all work.

A key that does not exist in ``default.yaml`` is an error naming the key and the file it
came from, so a typo never trains silently with a default. Sections whose default is an
empty mapping (``model.overrides``, ``crops``) are free-form here and checked by the code
that consumes them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "apply_override",
    "load_config",
    "merge",
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


def _free_paths(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted paths whose default is an empty mapping: sections checked by their consumer."""
    out = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= {f"{prefix}{key}"} if not value else _free_paths(value, f"{prefix}{key}.")
    return out


def merge(
    base: dict, update: dict, *, source: str, prefix: str = "", free: set[str] | None = None
) -> dict:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys are an error.

    Sections listed in ``free`` (dotted paths; by default those that are empty mappings in
    ``default.yaml``) accept any sub-keys.
    """
    if free is None:
        free = _free_paths(_read_yaml(DEFAULT_CONFIG))
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            raise ConfigError(f"{source}: unknown config key '{dotted}'")
        current = out[key]
        section = isinstance(current, dict) and (current or dotted in free)
        if section and isinstance(value, dict):
            if dotted in free:
                merged = copy.deepcopy(current)
                merged.update(copy.deepcopy(value))
                out[key] = merged
            else:
                out[key] = merge(current, value, source=source, prefix=f"{dotted}.", free=free)
        elif section and value is not None:
            raise ConfigError(
                f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}"
            )
        elif isinstance(value, dict) and current is not None and not isinstance(current, dict):
            raise ConfigError(f"{source}: '{dotted}' is a value, not a section; got {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, item: str) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a copy of ``cfg``."""
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
    return merge(cfg, nested, source=f"override '{item}'")


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
    """Return the merged config dict: default, then recipe ``path``, then ``overrides``.

    ``path`` may join recipes with ``+`` (``"dinov2+cpu"``: the ``cpu`` sizes over the
    ``dinov2`` recipe). ``cfg["_meta"]`` records the recipe files and the overrides (saved
    with each run).
    """
    cfg = _read_yaml(DEFAULT_CONFIG)
    recipe_file = None
    if path is not None:
        files = [resolve_recipe(name) for name in _recipe_names(path)]
        recipe_file = "+".join(str(f) for f in files)
        for f in files:
            if f.resolve() == DEFAULT_CONFIG.resolve():
                continue
            for source, data in _load_recipe(f):
                cfg = merge(cfg, data, source=str(source))
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    validate(cfg)
    cfg["_meta"] = {
        "recipe": recipe_file,
        "overrides": list(overrides or []),
    }
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: dict) -> None:
    """Check value ranges that would otherwise fail deep inside training."""
    try:
        _validate(cfg)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config value of the wrong type: {exc}") from exc


def _validate(cfg: dict) -> None:
    t, o, tea = cfg["train"], cfg["optim"], cfg["teacher"]
    _require(int(t["batch_size"]) >= 1, f"train.batch_size must be >= 1, got {t['batch_size']}")
    _require(int(t["accum_steps"]) >= 1, f"train.accum_steps must be >= 1, got {t['accum_steps']}")
    _require(int(t["epochs"]) >= 1, f"train.epochs must be >= 1, got {t['epochs']}")
    _require(
        t["precision"] in ("fp32", "bf16"),
        f"train.precision must be 'fp32' or 'bf16', got {t['precision']!r}",
    )
    _require(float(o["lr"]) >= 0, f"optim.lr must be >= 0, got {o['lr']}")
    _require(0 < float(o["layer_decay"]) <= 1, "optim.layer_decay must be in (0, 1]")
    _require(
        0 <= float(tea["momentum"]) <= 1 and 0 <= float(tea["momentum_end"]) <= 1,
        "teacher.momentum and teacher.momentum_end must be in [0, 1]",
    )
    _require(
        cfg["dino"]["centering"] in ("centering", "sinkhorn_knopp"),
        f"dino.centering must be 'centering' or 'sinkhorn_knopp', got {cfg['dino']['centering']!r}",
    )
    _require(
        cfg["data"]["on_bad_slide"] in ("error", "skip"),
        f"data.on_bad_slide must be 'error' or 'skip', got {cfg['data']['on_bad_slide']!r}",
    )
    _require(
        cfg["distributed"]["strategy"] in ("ddp", "fsdp"),
        f"distributed.strategy must be 'ddp' or 'fsdp', got {cfg['distributed']['strategy']!r}",
    )


def dump_config(cfg: dict, path: Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
