"""Gradient accumulation: k micro-batches == one k-times batch (weights, centres, teacher)."""

import copy

import pytest
import torch

from slidessl.ssl.meta import SSLMetaArch
from slidessl.train.optim import build_optimizer, param_groups
from slidessl.train.schedules import build_schedules
from slidessl.train.step import optimizer_step

from .conftest import random_slide


def _run(cfg, arch, batches_per_step):
    arch = copy.deepcopy(arch)
    opt = build_optimizer(param_groups(arch.student, cfg["optim"]["layer_decay"]), cfg)
    sch = build_schedules(cfg, steps_per_epoch=2, global_batch=4)
    losses, grads = [], None
    for step, micro in enumerate(batches_per_step):
        res = optimizer_step(
            arch, arch, opt, micro, sch.at(step), device=torch.device("cpu"), clip_grad=None
        )
        losses.append(res["loss"])
        if grads is None:
            grads = {
                n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None
            }
    return arch, losses, grads


@pytest.mark.parametrize("arrange", [0.0, 1.0])
def test_k_micro_batches_equal_one_big_batch(tiny_cfg, make_batch, rng, arrange):
    """(With the arrangement contrast too: its shuffles are drawn with the crops, so a batch
    split into micro-batches sees the same ones.)"""
    recipe = "dinov2"  # DINO + iBOT with a separate head, local crops, centering
    extra = [
        f"arrange.loss_weight={arrange}",
        "optim.freeze_last_layer_epochs=0",
        "optim.warmup_epochs=0",
        "koleo.loss_weight=0",
        "dino.centering=centering",
        "crops.mask_probability=1.0",
        # gradients that are zero in exact arithmetic (e.g. key biases under softmax)
        # are float noise; Adam would blow that noise up to lr-sized steps
        "optim.eps=1e-4",
    ]
    cfg = tiny_cfg(recipe, *extra)
    torch.manual_seed(int(rng.integers(1 << 30)))
    arch = SSLMetaArch(cfg, backbone=_encoder(cfg))
    slides = [random_slide(rng, i) for i in range(8)]
    big = [[make_batch(cfg, slides[0:4])], [make_batch(cfg, slides[4:8])]]
    small = [
        [make_batch(cfg, slides[0:2]), make_batch(cfg, slides[2:4])],
        [make_batch(cfg, slides[4:6]), make_batch(cfg, slides[6:8])],
    ]
    a_big, l_big, g_big = _run(cfg, arch, big)
    a_small, l_small, g_small = _run(cfg, arch, small)
    assert l_big == pytest.approx(l_small, abs=1e-5)
    assert g_big.keys() == g_small.keys() and len(g_big) > 10
    for name, g in g_big.items():
        assert torch.allclose(g, g_small[name], atol=1e-6, rtol=1e-4), name
    for (name, p), q in zip(a_big.state_dict().items(), a_small.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    # the step really trained and the centre really moved
    assert not torch.allclose(a_big.dino_loss.center, arch.dino_loss.center)
    before = dict(arch.student.named_parameters())
    moved = [n for n, p in a_big.student.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > 10


def _encoder(cfg):
    from slidessl.models.encoder import build_encoder

    return build_encoder(cfg["model"]["name"], **cfg["model"]["overrides"])
