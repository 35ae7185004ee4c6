"""SSLMetaArch: loss composition, centres per optimizer step, EMA teacher."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slidessl.data.collate import collate_views
from slidessl.data.views import MultiCrop, MultiCropConfig
from slidessl.models.encoder import build_encoder
from slidessl.ssl.meta import SSLMetaArch
from slidessl.train.config import load_config

TINY = [
    "model.name=tiny",
    "model.overrides={depth: 1, in_dim: 8, embed_dim: 16, num_heads: 2, mlp_dim: 32, "
    "local_kernel: 0, local_depth: 0, input_center: false, pos_mode: xy}",
    "dino.out_dim=32",
    "dino.hidden_dim=16",
    "dino.bottleneck_dim=8",
    "ibot.out_dim=32",
    "ibot.hidden_dim=16",
    "ibot.bottleneck_dim=8",
    "crops.global_max_tiles=48",
    "crops.local_max_tiles=16",
    "crops.global_min_tiles=12",
    "crops.local_min_tiles=4",
    "crops.mask_probability=1.0",
    # the formulas below are DINO / iBOT / KoLeo on the CLS as the papers write them; the
    # shipped recipes' token-mean readout and arrangement contrast are tested on their own
    "dino.readout=cls",
    "arrange.loss_weight=0.0",
]


def _setup(rng, recipe="dino", *extra, n_slides=3):
    cfg = load_config(recipe, [*TINY, *extra])
    torch.manual_seed(int(rng.integers(1 << 30)))
    enc = build_encoder("tiny", **cfg["model"]["overrides"])
    arch = SSLMetaArch(cfg, backbone=enc)
    mc = MultiCrop(MultiCropConfig.from_dict(cfg["crops"]))
    views = []
    for i in range(n_slides):
        n = int(rng.integers(50, 90))
        grid = np.stack([np.arange(n) % 10, np.arange(n) // 10], 1)
        slide = {
            "slide_id": f"s{i}",
            "index": i,
            "grid": torch.from_numpy(grid),
            "features": torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32)),
        }
        views.append(mc(slide, rng))
    return cfg, arch, collate_views(views)


def _double(batch):
    return {
        k: {
            n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t
            for n, t in v.items()
        }
        if isinstance(v, dict)
        else v
        for k, v in batch.items()
    }


def test_teacher_starts_as_student_and_gets_no_gradient(rng):
    _, arch, batch = _setup(rng, "dino", "crops.n_local=2")
    for (n, s), t in zip(arch.student.state_dict().items(), arch.teacher.state_dict().values()):
        assert torch.equal(s, t), n
    loss, logs = arch.compute_loss(batch, teacher_temp=0.04)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(logs) == {"loss", "dino_loss"}
    loss.backward()
    assert all(p.grad is None for p in arch.teacher.parameters())
    assert all(not p.requires_grad for p in arch.teacher.parameters())
    grads = [p.grad for n, p in arch.student.named_parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
    # the prototype norm g is fixed at one (DINO norm_last_layer)
    g = arch.student["dino_head"].last_layer.parametrizations.weight.original0
    assert not g.requires_grad


def _manual_dino(cfg, arch, g, temp, center=None):
    """The DINO loss of two global crops per slide, written out: each crop's student
    against the other crop's centred, sharpened teacher."""
    with torch.no_grad():
        outs = [
            part["dino_head"](
                part["backbone"].forward_tokens(
                    g["features"], g["coords"], g["padding_mask"], center=center
                )[0]
            )
            for part in (arch.teacher, arch.student)
        ]
    p = torch.softmax((outs[0] - arch.dino_loss.center) / temp, -1).chunk(2)
    logp = F.log_softmax(outs[1] / cfg["dino"]["student_temp"], -1).chunk(2)
    ce = lambda a, b: -(a * b).sum(-1).mean()  # noqa: E731
    return 0.5 * (ce(p[1], logp[0]) + ce(p[0], logp[1]))


def test_dino_loss_pairs_match_manual_formula(rng):
    cfg, arch, batch = _setup(rng, "dino", "crops.n_local=0")
    temp = float(rng.uniform(0.03, 0.08))
    loss, _ = arch.compute_loss(batch, teacher_temp=temp)
    expected = _manual_dino(cfg, arch, batch["global"], temp)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_centres_move_only_in_update_centers(rng):
    _, arch, batch = _setup(
        rng, "dinov2", "dino.centering=centering", "crops.n_local=1", "koleo.loss_weight=0.1"
    )
    c0 = {k: v.clone() for k, v in arch.centers().items()}
    assert set(c0) == {"dino", "ibot"}
    loss, logs = arch.compute_loss(batch, teacher_temp=0.04)
    assert {"ibot_loss", "koleo_loss"} <= set(logs)
    assert all(torch.equal(c0[k], v) for k, v in arch.centers().items())
    arch.update_centers()
    assert all(not torch.equal(c0[k], v) for k, v in arch.centers().items())
    assert "ibot_head" in arch.student  # dinov2 uses a separate iBOT head


def test_ema_update_exact(rng):
    _, arch, _ = _setup(rng)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in arch.teacher.parameters()]
    m = float(rng.uniform(0.9, 0.999))
    arch.update_teacher(m)
    for before, s, t in zip(t0, arch.student.parameters(), arch.teacher.parameters()):
        assert torch.allclose(t, m * before + (1 - m) * s, atol=1e-6)


def test_clear_errors(rng):
    _, arch, batch = _setup(rng, "dinov2", "crops.n_local=1", n_slides=1)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        arch.compute_loss(batch, 0.04)
    _, arch, batch = _setup(rng, "dinov2", "koleo.loss_weight=0")
    del batch["global"]["ibot_mask"]
    with pytest.raises(ValueError, match="ibot_mask"):
        arch.compute_loss(batch, 0.04)
    cfg = load_config("dinov2", [*TINY, "ibot.separate_head=false", "ibot.out_dim=16"])
    with pytest.raises(ValueError, match="ibot.out_dim must equal dino.out_dim"):
        SSLMetaArch(cfg, backbone=build_encoder("tiny", **cfg["model"]["overrides"]))


def test_teacher_stays_in_eval_mode(rng):
    _, arch, _ = _setup(rng)
    arch.train()
    assert arch.student.training and not arch.teacher.training


def test_crops_are_centred_on_their_slide_mean(rng):
    """With input_center, student and teacher see every crop centred on its *slide's* mean
    (the crops' `center`), not on the crop's own: the DINO loss equals the manual formula
    computed with that centre, and adding one shift to a slide's tiles changes nothing."""
    cfg, arch, batch = _setup(rng, "dino", "crops.n_local=0", "model.overrides.input_center=true")
    temp = 0.05
    loss, _ = arch.compute_loss(batch, teacher_temp=temp)
    g = batch["global"]
    expected = _manual_dino(cfg, arch, g, temp, center=g["center"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    shifted = {
        **batch,
        "global": {**g, "features": g["features"] + 3.0, "center": g["center"] + 3.0},
    }
    loss2, _ = arch.compute_loss(shifted, teacher_temp=temp)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


def test_cap_masked_keeps_at_most_cap_per_crop_inside_the_mask(rng):
    from slidessl.ssl.meta import cap_masked

    mask = torch.from_numpy(rng.random((4, 30)) < 0.6)
    mask[1] = False
    capped = cap_masked(mask, 5)
    assert (capped & ~mask).sum() == 0  # only masked tokens are scored
    counts, before = capped.sum(1), mask.sum(1)
    assert torch.equal(counts, before.clamp(max=5))
    state = torch.get_rng_state()
    assert cap_masked(mask, 30) is mask and cap_masked(mask, None) is mask
    assert torch.equal(torch.get_rng_state(), state)  # no draw when nothing is over the cap


def test_head_chunking_changes_no_loss_or_gradient(rng):
    """ibot.chunk_tokens bounds the head's memory; the iBOT loss and the student's
    gradients are those of one unchunked call."""
    cfg, arch, batch = _setup(rng, "dinov2", "crops.mask_ratio=[0.3,0.5]", "ibot.chunk_tokens=null")
    arch.double()  # float64: the chunked and the one-call sums agree to rounding
    batch = _double(batch)
    loss, logs = arch.compute_loss(batch, teacher_temp=0.05)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
    arch.zero_grad(set_to_none=True)
    arch.head_chunk = 3
    loss2, logs2 = arch.compute_loss(batch, teacher_temp=0.05)
    loss2.backward()
    assert logs["ibot_loss"] > 0
    torch.testing.assert_close(logs2["ibot_loss"], logs["ibot_loss"])
    torch.testing.assert_close(loss2, loss)
    for name, p in arch.student.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6)


def test_masked_cap_scores_fewer_tokens(rng):
    cfg, arch, batch = _setup(
        rng, "dinov2", "crops.mask_ratio=[0.4,0.5]", "ibot.max_masked_per_crop=2"
    )
    assert arch.max_masked == 2
    loss, logs = arch.compute_loss(batch, teacher_temp=0.05)
    assert torch.isfinite(loss) and logs["ibot_loss"] > 0


@pytest.mark.parametrize(
    "recipe,readout,arrange",
    [("dino", "cls", 0), ("dinov2", "cls", 0), ("dinov2", "mean", 0), ("dinov2", "mean", 1)],
)
def test_packed_crops_give_the_padded_loss_and_gradients(rng, recipe, readout, arrange):
    """train.pack_crops runs every crop of the micro-batch (globals and locals of all
    slides) as one packed stream per encoder: loss terms and student gradients equal the
    padded per-batch calls (float64), and the student encoder is called once (plus one
    packed call for the arrangement contrast's shuffled global crops)."""
    extra = ["crops.n_local=3", f"dino.readout={readout}", f"arrange.loss_weight={arrange}"]
    extra += ["crops.mask_ratio=[0.3,0.5]"] if recipe == "dinov2" else []
    cfg, arch, batch = _setup(rng, recipe, *extra, n_slides=3)
    arch.double()
    batch = _double(batch)
    assert arch.pack_crops and len(set(batch["global"]["lengths"] + batch["local"]["lengths"])) > 1
    calls = []
    backbone = arch.student["backbone"]
    for name in ("forward_packed", "forward_tokens"):
        orig = getattr(backbone, name)
        setattr(
            backbone, name, lambda *a, _n=name, _f=orig, **k: (calls.append(_n), _f(*a, **k))[1]
        )
    state = torch.get_rng_state()
    loss, logs = arch.compute_loss(batch, teacher_temp=0.05)
    loss.backward()
    assert calls == ["forward_packed"] * (1 + arrange)
    ref = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
    arch.zero_grad(set_to_none=True)
    arch.discard_pending_centers()
    arch.pack_crops = False
    torch.set_rng_state(state)
    loss2, logs2 = arch.compute_loss(batch, teacher_temp=0.05)
    loss2.backward()
    assert calls[1 + arrange :] == ["forward_tokens"] * (2 + arrange)
    assert set(logs) == set(logs2)
    for key in logs:
        torch.testing.assert_close(logs2[key], logs[key], rtol=1e-10, atol=1e-12)
    assert set(ref) == {n for n, p in arch.student.named_parameters() if p.grad is not None}
    for name, p in arch.student.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-8, atol=1e-10)


def test_packing_falls_back_for_grid_encoders(rng):
    """Encoders with a grid convolution or neighbourhood blocks take padded calls."""
    cfg = load_config("dino", [*TINY])
    arch = SSLMetaArch(cfg, backbone=build_encoder("tiny", in_dim=8, grid_context=3))
    assert not arch.pack_crops
    with pytest.raises(ValueError, match="forward_packed needs"):
        arch.student["backbone"].forward_packed(torch.zeros(2, 8), torch.zeros(2, 2), [2])


def test_dino_reads_the_token_mean_with_readout_mean(rng):
    """dino.readout=mean: the DINO head's input is the mean of the final (normed) tile
    tokens of each crop, the vector `slidessl embed --pooling mean` reads."""
    _, arch, batch = _setup(rng, "dino", "crops.n_local=2", "dino.readout=mean")
    arch.pack_crops = False
    seen = []
    arch.teacher["dino_head"].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    arch.compute_loss(batch, teacher_temp=0.05)
    g = batch["global"]
    with torch.no_grad():
        _, tokens = arch.teacher["backbone"].forward_tokens(
            g["features"], g["coords"], g["padding_mask"], center=g["center"]
        )
    keep = (~g["padding_mask"]).unsqueeze(-1).float()
    want = (tokens * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dino.readout"):
        _setup(rng, "dino", "dino.readout=max")


def test_vicreg_term_joins_the_loss(rng):
    """vicreg.loss_weight > 0 adds the variance-covariance term of the student's global slide
    vectors (one per global crop index) and reaches the encoder."""
    _, arch, batch = _setup(rng, "dino", "crops.n_local=2", "vicreg.loss_weight=2.0")
    loss, logs = arch.compute_loss(batch, teacher_temp=0.05)
    assert "vicreg_loss" in logs and float(logs["vicreg_loss"]) > 0
    total = logs["dino_loss"] + 2.0 * logs["vicreg_loss"]
    torch.testing.assert_close(logs["loss"], total)
    loss.backward()
    assert arch.student["backbone"].patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("local", [True, False])
def test_arrangement_term(rng, local):
    """arrange.loss_weight > 0: each student global crop against its tiles shuffled. An
    encoder that cannot see positions (dense blocks, no positions) scores exactly log 2;
    neighbourhood attention sees the shuffle and gets a gradient from it."""
    arch_kw = ["model.overrides.pos_mode=none", "dino.readout=mean"]
    if local:  # (one block: its tile tokens see their neighbours, its CLS does not yet)
        arch_kw += ["model.overrides.local_kernel=3", "model.overrides.local_depth=1"]
    cfg, arch, batch = _setup(rng, "dino", "crops.n_local=2", "arrange.loss_weight=1.0", *arch_kw)
    loss, logs = arch.compute_loss(batch, teacher_temp=0.05)
    if local:
        assert abs(float(logs["arrange_loss"]) - np.log(2)) > 1e-4
        loss.backward()
        assert arch.student["backbone"].blocks[0].self_attn.rel_bias.grad is not None
    else:
        assert float(logs["arrange_loss"]) == pytest.approx(np.log(2), abs=1e-5)
