"""Export and import of slide encoders: ``model.safetensors`` + ``config.json``.

``save_encoder(encoder, folder)`` writes the weights as safetensors (loading cannot run
code) and the architecture as JSON. ``load_encoder(path)`` accepts such a folder, the
``model.safetensors`` file inside it, or a training checkpoint ``.pt`` holding
``{"encoder_config": dict, "teacher_backbone": state_dict}`` (read with
``torch.load(weights_only=True)``). The encoder comes back in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slidessl.models.encoder import SlideEncoder

__all__ = ["save_encoder", "load_encoder", "load_state_strict", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "slidessl.SlideEncoder"


def save_encoder(encoder: SlideEncoder, folder) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder."""
    from safetensors.torch import save

    from slidessl.atomic import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "version": 1, "config": encoder.config}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(folder / CONFIG_NAME, text.encode())
    return folder


def load_state_strict(model: torch.nn.Module, state: dict, source) -> None:
    """``load_state_dict`` that names the file and every missing / unexpected / misshapen key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source}: weights do not match the encoder architecture"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shapes),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:20])
                    + (" ..." if len(items) > 20 else "")
                )
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _read_config(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the encoder config ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a slidessl encoder config (expected format {FORMAT!r})")
    return meta["config"]


def _from_checkpoint(path: Path, map_location):
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe pickles
        raise ValueError(f"{path}: cannot read the checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "teacher_backbone" not in ckpt or "encoder_config" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path}: a training checkpoint needs 'teacher_backbone' and "
            f"'encoder_config' entries; found {keys}"
        )
    return dict(ckpt["encoder_config"]), ckpt["teacher_backbone"]


def load_encoder(path, map_location="cpu") -> SlideEncoder:
    """Load an exported folder, its ``model.safetensors``, or a training checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such encoder folder or checkpoint")
    if path.is_dir():
        cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_path.exists() or not weights.exists():
            raise ValueError(f"{path}: an encoder folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    elif path.suffix == ".safetensors":
        cfg_path, weights = path.with_name(CONFIG_NAME), path
        if not cfg_path.exists():
            raise ValueError(f"{path}: {CONFIG_NAME} is missing next to the weights")
    else:
        cfg, state = _from_checkpoint(path, map_location)
        encoder = SlideEncoder(**cfg)
        load_state_strict(encoder, state, path)
        return encoder.to(map_location).eval()
    cfg = _read_config(cfg_path)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{weights}: cannot read the weights ({exc})") from exc
    encoder = SlideEncoder(**cfg)
    load_state_strict(encoder, state, weights)
    return encoder.to(map_location).eval()
