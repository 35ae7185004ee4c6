"""EncoderConfig: typed options, choices as enums, presets as instances, plain export."""

import json

import pytest
import torch

from slidessl.models import PRESETS, SlideEncoder, build_encoder
from slidessl.models.blocks import Block
from slidessl.models.presets import Attention, EncoderConfig, Pool, PosMode


def test_presets_are_configs_and_options_convert():
    assert all(isinstance(cfg, EncoderConfig) for cfg in PRESETS.values())
    cfg = EncoderConfig(attention="dense", pos_mode="none", segments=[8, 16], dilations=[1, 2])
    assert cfg.attention is Attention.dense and cfg.pos_mode is PosMode.none
    assert cfg.segments == (8, 16) and cfg.pool == Pool.cls == "cls"
    plain = cfg.to_dict()
    assert plain["attention"] == "dense" and type(plain["attention"]) is str
    assert plain["segments"] == [8, 16]
    assert EncoderConfig.from_dict(json.loads(json.dumps(plain))) == cfg
    assert PRESETS["tiny"].replace(depth=1).depth == 1 and PRESETS["tiny"].depth == 2


@pytest.mark.parametrize(
    "options,match",
    [
        ({"depth": "2"}, "depth must be an int"),
        ({"depth": True}, "depth must be an int"),
        ({"subln": 1}, "subln must be a bool"),
        ({"drop_path_rate": "0.1"}, "drop_path_rate must be a number"),
        ({"attention": "sparse"}, r"attention must be one of \['dilated', 'dense'\]"),
        ({"pos_mode": "yx"}, "pos_mode must be one of"),
        ({"segments": 1024}, "segments must be a list of ints"),
        ({"segments": [64, 128], "dilations": [1]}, "segments / dilations"),
        ({"embed_dim": 66, "num_heads": 3}, "divisible by 4"),
        ({"local_kernel": 4, "local_depth": 1}, "odd local_kernel"),
    ],
)
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**options)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"unknown SlideEncoder option\(s\) \['dept'\]"):
        EncoderConfig.from_dict({"dept": 2})
    with pytest.raises(ValueError, match="unknown SlideEncoder option"):
        PRESETS["tiny"].replace(dept=2)


def test_encoder_from_config_equals_keywords():
    cfg = PRESETS["tiny"].replace(in_dim=24, local_kernel=3, local_depth=1, attention="dense")
    torch.manual_seed(0)
    a = SlideEncoder(cfg)
    torch.manual_seed(0)
    b = build_encoder("tiny", in_dim=24, local_kernel=3, local_depth=1, attention="dense")
    torch.manual_seed(0)
    c = SlideEncoder(**cfg.to_dict())
    assert a.cfg == b.cfg == c.cfg and a.config == cfg.to_dict()
    for other in (b, c):
        sa, so = a.state_dict(), other.state_dict()
        assert sa.keys() == so.keys() and all(torch.equal(sa[k], so[k]) for k in sa)
    assert [blk.local for blk in a.blocks] == [True, False]


def test_block_reads_its_layer_of_the_config():
    cfg = PRESETS["tiny"].replace(local_kernel=3, local_depth=1, pos_bias="alibi2d")
    local, alibi = Block(cfg, 0), Block(cfg.replace(attention="dense"), 1, drop_path=0.1)
    assert local.local and not alibi.local and alibi.self_attn.alibi
    assert alibi.drop_path.p == 0.1 and alibi.ffn.fc1.out_features == cfg.mlp_dim
    with pytest.raises(ValueError, match="2-D ALiBi is implemented for dense attention only"):
        Block(cfg, 1)
