"""Export / import round trips and readable errors."""

import json

import pytest
import torch

import slidessl
from slidessl.models import build_encoder, save_encoder
from slidessl.models.io import load_encoder


def _enc():
    enc = build_encoder("tiny", in_dim=12, pool="mean")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return enc.eval()


def _same(a, b):
    x = torch.randn(2, 20, 12)
    c = torch.randint(0, 30, (2, 20, 2))
    torch.testing.assert_close(a(x, c), b(x, c), rtol=0, atol=0)


def test_folder_and_file_round_trip(tmp_path):
    enc = _enc()
    save_encoder(enc, tmp_path / "teacher")
    for path in (tmp_path / "teacher", tmp_path / "teacher" / "model.safetensors"):
        loaded = slidessl.load_encoder(path)
        assert not loaded.training and loaded.config == enc.config
        _same(enc, loaded)


def test_training_checkpoint(tmp_path):
    enc = _enc()
    torch.save(
        {
            "encoder_config": enc.config,
            "teacher_backbone": enc.state_dict(),
            "step": 7,
            "optimizer": {"lr": 0.1},
        },
        tmp_path / "ckpt.pt",
    )
    _same(enc, load_encoder(tmp_path / "ckpt.pt"))
    torch.save({"model": enc.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*teacher_backbone"):
        load_encoder(tmp_path / "other.pt")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs config.json"):
        load_encoder(tmp_path / "empty")
    enc = _enc()
    folder = save_encoder(enc, tmp_path / "t")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors.*\n.*missing.*blocks\.2\."):
        load_encoder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: cannot read"):
        load_encoder(folder)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt: cannot read"):
        load_encoder(tmp_path / "junk.pt")
