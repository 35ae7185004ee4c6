"""Shared fixtures for the trainer tests: a tiny config and random slides -> batches."""

import numpy as np
import pytest
import torch

from slidessl.data.collate import collate_views
from slidessl.data.views import MultiCrop, MultiCropConfig
from slidessl.train.config import load_config

TINY = [
    "model.name=tiny",
    "model.overrides={depth: 2, in_dim: 16, embed_dim: 32, num_heads: 4, mlp_dim: 64}",
    "dino.out_dim=64",
    "dino.hidden_dim=32",
    "dino.bottleneck_dim=16",
    "ibot.out_dim=64",
    "ibot.hidden_dim=32",
    "ibot.bottleneck_dim=16",
    "crops.n_local=2",
    "crops.global_max_tiles=64",
    "crops.local_max_tiles=24",
    "crops.global_min_tiles=16",
    "crops.local_min_tiles=6",
    "data.num_workers=0",
    "train.progress=false",
    "train.tensorboard=false",
    "train.precision=fp32",
    "optim.lr=1e-3",
    "optim.scale_lr=false",
]


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(recipe, *overrides)`` -> config dict for a very small encoder and heads."""

    def make(recipe="dino", *extra):
        return load_config(recipe, [*TINY, *extra])

    return make


def random_slide(rng, index, n=None, dim=16):
    n = int(rng.integers(60, 140)) if n is None else n
    side = int(np.ceil(np.sqrt(n * 1.6)))
    cells = rng.choice(side * side, size=n, replace=False)
    grid = np.stack([cells % side, cells // side], axis=1)
    return {
        "slide_id": f"s{index}",
        "index": index,
        "features": torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)),
        "grid": torch.from_numpy(grid.astype(np.int64)),
    }


@pytest.fixture
def make_batch():
    """``make_batch(cfg, slides, seed)`` -> one collated batch of those slides' views."""

    def make(cfg, slides, seed=0):
        mc = MultiCrop(MultiCropConfig.from_dict(cfg["crops"]))
        views = [mc(s, np.random.default_rng([seed, s["index"]])) for s in slides]
        return collate_views(views)

    return make
