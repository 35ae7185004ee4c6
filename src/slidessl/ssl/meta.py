"""Student/teacher meta-architecture for DINO, DINOv2 and DINOv2-grid slide pretraining.

Composition after Caron et al. (DINO, ICCV 2021) and Oquab et al. (DINOv2, TMLR 2024):
the student and the teacher each hold a slide encoder (``backbone``), a DINO head on the
CLS token and, optionally, a separate iBOT head on the masked tile tokens (Zhou et al.,
iBOT, ICLR 2022); KoLeo (Sablayrolles et al., ICLR 2019) spreads the student CLS and an
optional variance-covariance term (VICReg, Bardes et al., ICLR 2022) conditions it; an
optional arrangement contrast (``ssl.arrangement_loss``) asks it to tell a crop from its
tiles shuffled. The
teacher starts as a copy of the student, receives no gradient and follows the student as an
exponential moving average (``update_teacher``) once per optimizer step.

DINO loss pairs: every student crop (global and local) against every teacher global crop
except a global crop against itself, averaged over the number of pairs; each pair is a batch
mean, so the loss of a micro-batch scaled by its share of the global batch sums exactly to
the loss of the whole batch. Teacher centres accumulate per micro-batch and move only in
``update_centers`` (once per optimizer step, all-reduced across ranks).

Example::

    arch = SSLMetaArch.from_config(cfg, feature_dim=1536)
    optimizer = torch.optim.AdamW(param_groups(arch.student, layer_decay=0.9))  # train.optim
    loss, logs = arch.compute_loss(batch, teacher_temp=0.04)  # one micro-batch
    loss.backward()  # train.step.forward_backward: every micro-batch of a step
    optimizer.step()
    arch.update_centers(); arch.update_teacher(momentum=0.996)
    save_encoder(arch.teacher["backbone"], "out/teacher")
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slidessl.dtensor import local
from slidessl.models.encoder import build_encoder
from slidessl.models.packing import pack_padded, segment_mean
from slidessl.ssl.arrangement_loss import ArrangementLoss, shuffle_positions
from slidessl.ssl.dino_loss import DINOLoss
from slidessl.ssl.heads import DINOHead
from slidessl.ssl.ibot_loss import head_in_chunks, iBOTPatchLoss
from slidessl.ssl.koleo_loss import KoLeoLoss
from slidessl.ssl.vicreg_loss import VarianceCovarianceLoss

__all__ = ["SSLMetaArch", "cap_masked"]


def _head(cfg: dict, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        int(cfg["out_dim"]),
        hidden_dim=int(cfg["hidden_dim"]),
        bottleneck_dim=int(cfg["bottleneck_dim"]),
        nlayers=int(cfg["nlayers"]),
    )


def _freeze_prototype_norm(head: nn.Module) -> None:
    """Fix the weight-norm magnitude ``g`` of the prototype layer at one (DINO's
    ``norm_last_layer=True``): only the prototype directions train."""
    para = getattr(getattr(head, "last_layer", None), "parametrizations", None)
    if para is not None and hasattr(para.weight, "original0"):
        para.weight.original0.requires_grad_(False)


def cap_masked(mask: torch.Tensor, cap: int | None) -> torch.Tensor:
    """The masked tokens the iBOT / MFP losses score: at most ``cap`` per crop (row of the
    (B, N) bool ``mask``), a uniformly random subset of a row that holds more (the encoder
    still sees every masked token as masked). Draws from torch's global RNG only when some
    row is over the cap, so uncapped runs consume no randomness here."""
    if cap is None or int(cap) <= 0:
        return mask
    if mask.numel() == 0 or int(mask.sum(dim=1).max()) <= int(cap):
        return mask
    scores = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return mask & (rank < int(cap))


class SSLMetaArch(nn.Module):
    """``student`` / ``teacher``: ``ModuleDict(backbone, dino_head[, ibot_head])``."""

    def __init__(self, cfg: dict, backbone: nn.Module | None = None) -> None:
        super().__init__()
        if backbone is None:
            backbone = build_encoder(cfg["model"]["name"], **dict(cfg["model"]["overrides"]))
        if cfg["train"].get("grad_checkpointing") and hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
        embed_dim = int(backbone.embed_dim)
        # every crop of a micro-batch in one packed (varlen) call per encoder, where it can
        self.pack_crops = bool(cfg["train"].get("pack_crops", True)) and bool(
            getattr(backbone, "packs", False)
        )
        d, ib, ko = cfg["dino"], cfg["ibot"], cfg["koleo"]
        self.dino_weight = float(d["loss_weight"])
        self.ibot_weight = float(ib["loss_weight"])
        self.koleo_weight = float(ko["loss_weight"])
        self.vicreg_weight = float(cfg.get("vicreg", {}).get("loss_weight", 0.0))
        arrange = cfg.get("arrange", {})
        self.arrange_weight = float(arrange.get("loss_weight", 0.0))
        self.sinkhorn = d["centering"] == "sinkhorn_knopp"
        # the slide vector the DINO head (and KoLeo) reads: the CLS, or the mean of the final
        # tile tokens - the vector `slidessl embed --pooling mean` reads
        self.readout = str(d.get("readout", "cls"))
        if self.readout not in ("cls", "mean"):
            raise ValueError(f"dino.readout must be 'cls' or 'mean', got {self.readout!r}")
        # memory bounds of the masked-token heads (tokens x K logits): rows per head call,
        # masked tokens scored per crop
        self.head_chunk = ib.get("chunk_tokens")
        self.max_masked = ib.get("max_masked_per_crop")
        if (
            self.ibot_weight > 0
            and not ib["separate_head"]
            and int(ib["out_dim"]) != int(d["out_dim"])
        ):
            raise ValueError(
                "ibot.separate_head=false shares the DINO head, so ibot.out_dim must equal "
                f"dino.out_dim ({ib['out_dim']} != {d['out_dim']})"
            )
        student = nn.ModuleDict({"backbone": backbone, "dino_head": _head(d, embed_dim)})
        if self.ibot_weight > 0 and ib["separate_head"]:
            student["ibot_head"] = _head(ib, embed_dim)
        for name, module in student.items():
            if name != "backbone":
                _freeze_prototype_norm(module)
        mask_token = getattr(backbone, "mask_token", None)
        if self.ibot_weight <= 0 and isinstance(mask_token, nn.Parameter):
            # no masking without iBOT: a parameter that never gets a gradient would make
            # DDP need find_unused_parameters (an extra graph walk every step)
            mask_token.requires_grad_(False)
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.dino_loss = DINOLoss(
            int(d["out_dim"]), float(d["student_temp"]), float(d["center_momentum"])
        )
        self.ibot_loss = (
            iBOTPatchLoss(
                int(ib["out_dim"]), float(ib["student_temp"]), float(ib["center_momentum"])
            )
            if self.ibot_weight > 0
            else None
        )
        self.koleo_loss = KoLeoLoss() if self.koleo_weight > 0 else None
        self.vicreg_loss = VarianceCovarianceLoss() if self.vicreg_weight > 0 else None
        self.arrange_loss = (
            ArrangementLoss(float(arrange.get("temperature", 0.1)))
            if self.arrange_weight > 0
            else None
        )
        # teacher outputs of global crop 0 (one row per slide) of each compute_loss call since
        # the trainer last took them (collapse monitors)
        self.monitor_rows: list[dict[str, torch.Tensor]] = []

    @classmethod
    def from_config(cls, cfg: dict, feature_dim: int) -> SSLMetaArch:
        """The meta-architecture of ``cfg``; the encoder's ``in_dim`` follows the data's
        feature dimension (a conflicting ``model.overrides.in_dim`` is an error)."""
        overrides = dict(cfg["model"]["overrides"])
        if "in_dim" in overrides and int(overrides["in_dim"]) != feature_dim:
            raise ValueError(
                f"model.overrides.in_dim={overrides['in_dim']} but the slides in "
                f"{cfg['data']['manifest']} have {feature_dim}-dimensional features"
            )
        overrides["in_dim"] = feature_dim
        return cls(cfg, backbone=build_encoder(cfg["model"]["name"], **overrides))

    def take_monitor_rows(self) -> list[dict[str, torch.Tensor]]:
        """The teacher outputs (global crop 0, one row per slide) of every ``compute_loss``
        since the last call, handed over and cleared (for the collapse monitors)."""
        rows, self.monitor_rows = self.monitor_rows, []
        return rows

    def discard_pending_centers(self) -> None:
        """Forget the centre sums of a skipped (non-finite) step."""
        for loss in (self.dino_loss, self.ibot_loss):
            if loss is not None:
                loss.discard_pending()

    # ------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    def _ibot_head(self, part: nn.ModuleDict) -> nn.Module:
        return part["ibot_head"] if "ibot_head" in part else part["dino_head"]

    def _teacher_targets(self, loss: nn.Module, logits: torch.Tensor, temp: float):
        if self.sinkhorn:
            return loss.sinkhorn_knopp_teacher(logits, temp)
        probs = loss.softmax_center_teacher(logits, temp)
        loss.accumulate_center(logits)
        return probs

    def _encode(self, backbone, crops: list[dict], token_mask=None, select=None):
        """Encode padded crop batches (the collate's ``global`` / ``local`` dicts):
        ``(slide vector of each batch, tokens of crops[0] where select)``; the slide vector is
        the CLS or the token mean (``dino.readout``); ``token_mask`` and ``select`` are
        ``(B, N)`` bool over ``crops[0]`` (``select`` None: no tokens).

        With ``pack_crops`` every row of every batch goes through the encoder as one packed
        token stream (no padding, one GEMM per linear layer, one attention call per segment
        length); otherwise one padded call per batch. Both give the same values."""
        if self.pack_crops and all("lengths" in c for c in crops):
            lengths = [c["lengths"] for c in crops]
            feats = torch.cat([pack_padded(c["features"], n) for c, n in zip(crops, lengths)])
            coords = torch.cat([pack_padded(c["coords"], n) for c, n in zip(crops, lengths)])
            center = None
            if all(c.get("center") is not None for c in crops):
                center = torch.cat([c["center"] for c in crops])
            t0 = sum(lengths[0])
            packed_mask = None
            if token_mask is not None:
                packed_mask = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
                packed_mask[:t0] = pack_padded(token_mask, lengths[0])
            flat = [n for ns in lengths for n in ns]
            cls, tokens = backbone.forward_packed(feats, coords, flat, packed_mask, center)
            if self.readout == "mean":
                cls = segment_mean(tokens, flat)
            parts = list(cls.split([len(n) for n in lengths]))
            chosen = None if select is None else tokens[:t0][pack_padded(select, lengths[0])]
            return parts, chosen
        parts, chosen = [], None
        for i, c in enumerate(crops):
            cls, tokens = backbone.forward_tokens(
                c["features"],
                c["coords"],
                padding_mask=c["padding_mask"],
                token_mask=token_mask if i == 0 else None,
                center=c.get("center"),
            )
            if self.readout == "mean":
                keep = (~c["padding_mask"]).unsqueeze(-1).to(tokens.dtype)
                cls = (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)
            parts.append(cls)
            if i == 0 and select is not None:
                chosen = tokens[select]
        return parts, chosen

    # ------------------------------------------------------------------ loss
    def forward(self, batch: dict, teacher_temp: float):
        return self.compute_loss(batch, teacher_temp)

    def compute_loss(self, batch: dict, teacher_temp: float):
        """Total loss of one (micro-)batch and a dict of detached per-term values.

        Adds the teacher logits to the pending centre sums; the centres do not move here.
        """
        g, n_g, n_l = batch["global"], int(batch["n_global"]), int(batch["n_local"])
        n_terms = n_g * (n_g - 1) + n_g * n_l
        if n_terms == 0:
            raise ValueError("DINO needs 2 global crops or at least one local crop per slide")
        masked = self.ibot_loss is not None
        mask = g.get("ibot_mask") if masked else None
        if masked and mask is None:
            raise ValueError(
                "ibot.loss_weight > 0 but the batch has no global "
                "ibot_mask (enable iBOT masking in the crops: section)"
            )
        logs: dict[str, torch.Tensor] = {}

        scored = None if mask is None else cap_masked(mask, self.max_masked)
        with torch.no_grad():
            (t_cls,), t_masked = self._encode(self.teacher["backbone"], [g], select=scored)
            t_logits = self.teacher["dino_head"](t_cls)
            t_probs = self._teacher_targets(self.dino_loss, t_logits, teacher_temp).chunk(n_g)
            self.monitor_rows.append(
                {
                    "teacher_logits": t_logits.chunk(n_g)[0].detach().float().cpu(),
                    "teacher_cls": t_cls.chunk(n_g)[0].detach().float().cpu(),
                }
            )
            del self.monitor_rows[:-64]
            if mask is not None and self.ibot_loss is not None:
                t_patch = head_in_chunks(self._ibot_head(self.teacher), t_masked, self.head_chunk)
                t_patch_probs = self._teacher_targets(self.ibot_loss, t_patch, teacher_temp)
                del t_patch

        crops = [g, batch["local"]] if n_l > 0 else [g]
        cls_parts, s_masked = self._encode(
            self.student["backbone"], crops, token_mask=mask, select=scored
        )
        s_cls = cls_parts[0]
        s_global = self.student["dino_head"](s_cls).chunk(n_g)
        s_local: tuple[torch.Tensor, ...] = ()
        if n_l > 0:
            s_local = self.student["dino_head"](cls_parts[1]).chunk(n_l)

        dino = s_global[0].new_zeros((), dtype=torch.float32)
        if n_l > 0:
            dino = dino + self.dino_loss(list(s_local), list(t_probs))
        for i in range(n_g):
            others = [t for j, t in enumerate(t_probs) if j != i]
            if others:
                dino = dino + self.dino_loss([s_global[i]], others)
        dino = dino / n_terms
        logs["dino_loss"] = dino.detach()
        total = self.dino_weight * dino

        if mask is not None and self.ibot_loss is not None:
            ibot = self.ibot_loss.forward_head_masked(
                self._ibot_head(self.student),
                s_masked,
                t_patch_probs,
                scored,
                self.head_chunk,
            )
            logs["ibot_loss"] = ibot.detach()
            total = total + self.ibot_weight * ibot
        # terms over the slides of a micro-batch, per global crop
        for name, loss, weight, why in (
            ("koleo", self.koleo_loss, self.koleo_weight, "KoLeo compares slides"),
            (
                "vicreg",
                self.vicreg_loss,
                self.vicreg_weight,
                "VICReg's variance and covariance are taken over slides",
            ),  # fmt: skip
        ):
            if loss is None:
                continue
            if s_cls.shape[0] < 2 * n_g:
                raise ValueError(
                    f"{name}.loss_weight > 0 needs train.batch_size >= 2 ({why} within a "
                    "micro-batch)"
                )
            term = sum(loss(c) for c in s_cls.chunk(n_g))
            logs[f"{name}_loss"] = term.detach()
            total = total + weight * term
        if self.arrange_loss is not None:
            arrange = self._arrangement(g, s_cls, t_cls, mask, n_g)
            logs["arrange_loss"] = arrange.detach()
            total = total + self.arrange_weight * arrange
        logs["loss"] = total.detach()
        return total, logs

    def _arrangement(self, g: dict, s_cls, t_cls, mask, n_g: int) -> torch.Tensor:
        """The arrangement contrast of the global crops: each student crop vs its tiles
        shuffled, against the teacher's vector of the slide's other global crop (one global
        crop: against its own teacher vector)."""
        if n_g < 1:
            raise ValueError("arrange.loss_weight > 0 needs global crops")
        coords = g.get("shuffled_coords")  # drawn with the crops (data.views): seeded
        if coords is None:
            coords = shuffle_positions(g["coords"], g["padding_mask"])
        shuffled = dict(g, coords=coords)  # packed like the crops when pack_crops is on
        (s_shuf,), _ = self._encode(self.student["backbone"], [shuffled], token_mask=mask)
        t_parts = t_cls.chunk(n_g)
        target = torch.cat([t_parts[(i + 1) % n_g] for i in range(n_g)])
        return self.arrange_loss(s_cls, s_shuf, target)

    # ------------------------------------------------------------------ per optimizer step
    @torch.no_grad()
    def update_centers(self) -> None:
        """Apply the pending centre sums (all-reduced across ranks) once per optimizer step."""
        if self.sinkhorn:
            return
        self.dino_loss.apply_center_update()
        if self.ibot_loss is not None:
            self.ibot_loss.apply_center_update()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = momentum * teacher + (1 - momentum) * student``, all parts."""
        for module in self.modules():  # FSDP2: registered params back to their shards
            if hasattr(module, "reshard") and hasattr(module, "unshard"):
                module.reshard()
        for name in self.student:
            # under FSDP both sides are sharded alike: update the local shards
            s_params = [local(p.detach()) for p in self.student[name].parameters()]
            t_params = [local(p.detach()) for p in self.teacher[name].parameters()]
            if len(s_params) != len(t_params):
                raise RuntimeError(f"student/teacher '{name}' parameter lists differ")
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    def centers(self) -> dict[str, torch.Tensor]:
        out = {"dino": self.dino_loss.center}
        if self.ibot_loss is not None:
            out["ibot"] = self.ibot_loss.center
        return out
