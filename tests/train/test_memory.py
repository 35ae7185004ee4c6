"""The step's peak-memory estimate and the check before the first step."""

import logging

import numpy as np
import pytest
import torch

from slidessl.data.synthetic import make_cohort
from slidessl.train.loop import _build_arch, pretrain
from slidessl.train.memory import (
    MemoryBudgetError,
    available_memory,
    check_memory,
    estimate_step_memory,
    saved_bytes_per_token,
)

from .conftest import random_slide


def _arch(cfg):
    torch.manual_seed(0)
    return _build_arch(cfg, 16)


def test_saved_bytes_per_token_is_measured_and_leaves_rng_alone(tiny_cfg):
    arch = _arch(tiny_cfg("dino"))
    backbone = arch.student["backbone"]
    state = torch.get_rng_state()
    full = saved_bytes_per_token(backbone, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    # at least the block inputs (depth x embed_dim fp32 per token) are kept
    assert full > len(backbone.blocks) * backbone.embed_dim * 4
    backbone.grad_checkpointing = True
    assert saved_bytes_per_token(backbone, "cpu") < full


def test_estimate_follows_crop_caps_batch_and_heads(tiny_cfg):
    cfg = tiny_cfg("dinov2", "train.batch_size=2", "arrange.loss_weight=0.0")
    arch = _arch(cfg)
    est = estimate_step_memory(cfg, arch.student["backbone"], arch, max_slide_tiles=5000)
    c = cfg["crops"]
    assert est.global_tiles == c["global_max_tiles"] and est.local_tiles == c["local_max_tiles"]
    assert est.student_tokens == 2 * (2 * (64 + 1) + 2 * (24 + 1))
    assert est.masked_tokens == 2 * 2 * round(64 * 0.5)
    small = estimate_step_memory(cfg, arch.student["backbone"], arch, max_slide_tiles=40)
    assert small.global_tiles == 40 and small.activations < est.activations
    capped = tiny_cfg("dinov2", "train.batch_size=2", "ibot.max_masked_per_crop=5")
    est_capped = estimate_step_memory(capped, arch.student["backbone"], arch, 5000)
    assert est_capped.masked_tokens == 2 * 2 * 5 and est_capped.heads < est.heads
    n_params = sum(p.numel() for p in arch.student.parameters())
    assert est.state >= 4 * 4 * n_params  # params + grads + two AdamW moments (+ teacher)


def test_estimate_counts_the_arrangement_pass(tiny_cfg):
    cfg = tiny_cfg("dinov2", "train.batch_size=2", "arrange.loss_weight=0.0")
    arch = _arch(cfg)
    base = estimate_step_memory(cfg, arch.student["backbone"], arch, max_slide_tiles=5000)
    cfg2 = tiny_cfg("dinov2", "train.batch_size=2", "arrange.loss_weight=1.0")
    est = estimate_step_memory(cfg2, arch.student["backbone"], arch, max_slide_tiles=5000)
    # one more student pass over the (shuffled) global crops
    assert est.student_tokens == base.student_tokens + 2 * 2 * (64 + 1)
    assert est.activations > base.activations


@pytest.mark.parametrize("arrange", [0.0, 1.0])
def test_estimate_bounds_what_a_step_saves_for_backward(tiny_cfg, make_batch, rng, arrange):
    """The activation + head terms are at least the bytes autograd really keeps in a
    dinov2 compute_loss on slides large enough for every crop to reach its cap (with and
    without the arrangement contrast's extra student pass)."""
    cfg = tiny_cfg(
        "dinov2", "train.batch_size=2", "crops.global_scale=[0.9,1.0]",
        f"arrange.loss_weight={arrange}",
    )  # fmt: skip
    arch = _arch(cfg)
    slides = [random_slide(rng, i, n=400) for i in range(2)]
    batch = make_batch(cfg, slides, seed=int(rng.integers(1000)))
    params = {p.untyped_storage().data_ptr() for p in arch.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = max(kept.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = arch.compute_loss(batch, teacher_temp=0.05)
    est = estimate_step_memory(cfg, arch.student["backbone"], arch, max_slide_tiles=400)
    measured = sum(kept.values())
    print(f"saved {measured} bytes, estimated {est.activations + est.heads}")
    assert est.activations + est.heads >= measured
    assert est.activations + est.heads <= 6 * measured  # an estimate, not a blanket bound


def test_check_names_the_knobs_and_respects_the_mode(tiny_cfg, caplog):
    cfg = tiny_cfg("dinov2", "train.batch_size=2", "train.memory_budget_gb=0.001")
    arch = _arch(cfg)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, arch, 5000)
    msg = str(info.value)
    for knob in (
        "crops.global_max_tiles",
        "train.batch_size",
        "train.grad_checkpointing=true",
        "ibot.max_masked_per_crop",
        "train.memory_check=warn",
    ):
        assert knob in msg
    assert "0.0 GiB of train.memory_budget_gb" in msg
    cfg["train"]["memory_check"] = "warn"
    with caplog.at_level(logging.WARNING, logger="slidessl.train.memory"):
        assert check_memory(cfg, arch, 5000) is not None
    assert "Lower it with" in caplog.text
    cfg["train"]["memory_check"] = "off"
    assert check_memory(cfg, arch, 5000) is None
    cfg["train"]["memory_check"] = "maybe"
    with pytest.raises(ValueError, match="train.memory_check must be one of"):
        check_memory(cfg, arch, 5000)


def test_pretrain_refuses_before_the_first_step(tiny_cfg, tmp_path):
    cohort = make_cohort(tmp_path / "c", n_slides=3, seed=5, dim=16, min_tiles=80, max_tiles=120)
    cfg = tiny_cfg(
        "dino", f"data.manifest={cohort}", f"out={tmp_path / 'run'}", "train.memory_budget_gb=0.01"
    )
    with pytest.raises(MemoryBudgetError, match="Lower it with"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_available_memory_reports_a_source():
    budget, where = available_memory("cpu")
    assert where
    if budget is not None:
        assert budget > 2**26 and np.isfinite(budget)
