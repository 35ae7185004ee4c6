import pytest
import torch
from torch import nn

from slidessl.models.encoder import build_encoder
from slidessl.ssl.heads import DINOHead
from slidessl.train.optim import apply_schedules, param_groups


def _student(depth):
    enc = build_encoder("tiny", depth=depth, in_dim=8)
    return nn.ModuleDict({"backbone": enc, "dino_head": DINOHead(64, 32, 16, 8)})


@pytest.mark.parametrize("depth", [2, 3])
def test_layer_decay_really_applies_per_block(depth):
    decay = 0.7
    groups = param_groups(_student(depth), layer_decay=decay)
    opt = torch.optim.AdamW(groups)
    apply_schedules(opt, lr=1.0, wd=0.1, last_layer_frozen=False)
    lr_of = {}
    wd_of = {}
    for g in opt.param_groups:
        for name in g["names"]:
            lr_of[name], wd_of[name] = g["lr"], g["weight_decay"]
    for i in range(depth):
        names = [n for n in lr_of if n.startswith(f"backbone.blocks.{i}.")]
        assert names
        for n in names:
            assert lr_of[n] == pytest.approx(decay ** (depth - i))
    assert lr_of["backbone.patch_embed.weight"] == pytest.approx(decay ** (depth + 1))
    assert lr_of["backbone.norm.weight"] == pytest.approx(1.0)
    assert lr_of["dino_head.mlp.0.weight"] == pytest.approx(1.0)
    # no weight decay on norms, biases and tokens; decay on matrices
    for n in (
        "backbone.cls_token",
        "backbone.mask_token",
        "backbone.norm.weight",
        "backbone.patch_embed.bias",
        "backbone.blocks.0.ffn.fc1.bias",
    ):
        assert wd_of[n] == 0.0, n
    assert wd_of["backbone.blocks.0.ffn.fc1.weight"] == pytest.approx(0.1)
    # every trainable parameter appears exactly once
    student = _student(depth)
    n_params = sum(1 for p in student.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params


def test_prototype_layer_frozen_gets_zero_lr():
    opt = torch.optim.AdamW(param_groups(_student(2), 1.0))
    apply_schedules(opt, lr=0.5, wd=0.0, last_layer_frozen=True)
    last = [g for g in opt.param_groups if g["is_last_layer"]]
    assert last and all(g["lr"] == 0.0 for g in last)
    assert all(n.startswith("dino_head.last_layer") for g in last for n in g["names"])
    assert all(g["lr"] > 0 for g in opt.param_groups if not g["is_last_layer"])
    apply_schedules(opt, lr=0.5, wd=0.0, last_layer_frozen=False)
    assert all(g["lr"] == pytest.approx(0.5) for g in last)


def test_bad_layer_decay():
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(_student(2), layer_decay=1.5)
