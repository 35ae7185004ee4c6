"""The slide encoder: tile embeddings + grid coordinates -> slide embedding.

A ViT over tiles (Dosovitskiy et al., 2021) with LongNet dilated attention (Ding et al.,
2023, arXiv:2307.02486), as in Prov-GigaPath's slide encoder (Xu et al., 2024, Nature):
input projection, 2-D sin-cos positions from grid coordinates, a CLS token, pre-norm blocks
with MAGNETO sub-LN, final LayerNorm. Exposes ``forward_features`` / ``forward`` (timm
style: ``forward_features`` -> tokens, ``forward_head`` -> slide vector,
``forward_intermediates``, ``set_grad_checkpointing``), ``forward_tokens`` (normalised CLS
and tile tokens, for self-distillation), a mask token for iBOT (Zhou et al., 2022).

Example::

    enc = build_encoder("tiny", in_dim=384)
    feats = enc.forward_features(x, coords, padding_mask)   # x (B,N,384), coords (B,N,2)
    slide = enc.forward_head(feats, padding_mask)          # (B, 64), = enc(x, coords, mask)
    blocks = enc.forward_intermediates(x, coords, indices=[-1, -2], norm=True,
                                       intermediates_only=True)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slidessl.models.blocks import Block
from slidessl.models.gridconv import GridContext, grid_neighbours
from slidessl.models.packing import segment_mean, stream_index
from slidessl.models.posenc import sincos_2d
from slidessl.models.presets import PRESETS, EncoderConfig, Pool, PosBias

__all__ = [
    "READOUTS",
    "SlideEncoder",
    "build_encoder",
    "readout",
    "PRESETS",
    "EncoderConfig",
]


class SlideEncoder(nn.Module):
    """Slide encoder built from an :class:`EncoderConfig` (or its options as keywords, or a
    config with some options changed); ``SlideEncoder(**encoder.config)`` rebuilds the same
    architecture. ``cfg`` is the typed config, ``config`` its plain dict (what is exported)."""

    def __init__(self, cfg: EncoderConfig | None = None, **options):
        super().__init__()
        if cfg is None:
            cfg = EncoderConfig.from_dict(options)
        elif options:
            cfg = cfg.replace(**options)
        self.cfg = cfg
        self.in_dim, self.embed_dim, self.depth = cfg.in_dim, cfg.embed_dim, cfg.depth
        self.grad_checkpointing = cfg.grad_checkpointing
        e = self.embed_dim
        self.patch_embed = nn.Linear(self.in_dim, e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, e))
        self.grid_context = GridContext(e, cfg.grid_context) if cfg.grid_context else None
        self.local_kernel = cfg.local_kernel
        dpr = np.linspace(0.0, cfg.drop_path_rate, self.depth) if self.depth else []
        self.blocks = nn.ModuleList(Block(cfg, i, float(dpr[i])) for i in range(self.depth))
        self.encoder_norm = nn.LayerNorm(e, eps=cfg.block_eps) if cfg.encoder_norm else None
        self.norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        self.reset_parameters()

    @property
    def config(self) -> dict:
        """The options as plain values (``EncoderConfig.to_dict``): the exported config."""
        return self.cfg.to_dict()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Xavier-uniform weights and zero biases for a linear, ones and zeros for a norm."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def reset_parameters(self):
        """:meth:`_init_weights` on every module, N(0, 0.02) CLS and mask token; MAGNETO
        sub-LN scaling.

        The mask token is not zero (as MAE's): with no absolute positions, masked tiles
        whose whole receptive field is masked would otherwise be exact zero vectors through
        every block (zero biases at init), and LayerNorm's backward at a zero-variance input
        multiplies the gradient by ``1 / sqrt(eps)`` (~316) per norm: 1e30 gradients after
        nine of them, from a finite loss."""
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.grid_context is not None:
            self.grid_context.reset_parameters()
        for blk in self.blocks:
            if blk.local:
                nn.init.zeros_(blk.self_attn.rel_bias)
                if blk.self_attn.pos_proj is not None:  # start position-free
                    nn.init.zeros_(blk.self_attn.pos_proj.weight)
        if self.cfg.subln and self.cfg.subln_init and self.depth:
            gain = math.sqrt(math.log(2 * self.depth))
            for blk in self.blocks:
                for lin in (blk.ffn.fc1, blk.ffn.fc2, blk.self_attn.out_proj, blk.self_attn.v_proj):
                    lin.weight.data.mul_(gain)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (a runtime switch, as timm's; the exported
        ``config`` keeps what the encoder was built with)."""
        self.grad_checkpointing = bool(enable)

    def _check(self, x, coords, padding_mask, token_mask):
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"features must be (B, N, {self.in_dim}), got {tuple(x.shape)}")
        if coords.shape != x.shape[:2] + (2,):
            raise ValueError(
                f"coords must be (B, N, 2) = {tuple(x.shape[:2]) + (2,)}, got {tuple(coords.shape)}"
            )
        for name, m in (("padding_mask", padding_mask), ("token_mask", token_mask)):
            if m is not None and (m.shape != x.shape[:2] or m.dtype != torch.bool):
                raise ValueError(
                    f"{name} must be bool (B, N) = {tuple(x.shape[:2])}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )

    def _embed(self, x, coords, token_mask=None, center=None, own_mean=None):
        """Tile tokens, the prefix every forward path shares: with ``input_center`` the
        features less ``center`` (broadcast to ``x``) or, without one, less ``own_mean(x)``
        (each input's own mean, as the path lays inputs out); the projection; the mask token
        where ``token_mask``; positions."""
        if self.cfg.input_center:
            x = x - (own_mean(x) if center is None else center.to(x.dtype))
        h = self.patch_embed(x)
        if token_mask is not None:
            h = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(h.dtype)[0], h)
        return h + sincos_2d(coords, self.embed_dim, self.cfg.pos_mode.value).to(h.dtype)

    def _block(self, blk, h, *args):
        """One block, recomputed in backward under gradient checkpointing."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, h, *args, use_reentrant=False)
        return blk(h, *args)

    def _trunk(self, x, coords, padding_mask, token_mask, center, keep=None):
        """Blocks over the input: ``(h, mask, states)``; ``h`` (B, 1+N, E) after the
        encoder norm, before the final norm; ``states`` the block input and block outputs
        whose positions (0 = input, i = block i) are in ``keep``."""
        self._check(x, coords, padding_mask, token_mask)
        center = None if center is None else center.unsqueeze(1)
        h = self._embed(x, coords, token_mask, center, lambda x: _masked_mean(x, padding_mask))
        if self.grid_context is not None:
            h = h + self.grid_context(h, coords, padding_mask)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        mask = None
        if padding_mask is not None:
            mask = torch.cat([padding_mask.new_zeros(h.shape[0], 1), padding_mask], dim=1)
            h = h.masked_fill(mask.unsqueeze(-1), 0.0)
        neighbours = None
        if self.local_kernel:
            neighbours = grid_neighbours(coords, padding_mask, self.local_kernel)
        keep = set() if keep is None else keep
        states = [h] if 0 in keep else []
        for i, blk in enumerate(self.blocks, start=1):
            h = self._block(blk, h, mask, neighbours, coords)
            if i in keep:
                states.append(h)
        if self.encoder_norm is not None:
            h = self.encoder_norm(h)
        return h, mask, states

    def _final_norm(self, h):
        """The final norm as ``forward_features`` applies it: on every token for
        ``pool="cls"``; for ``pool="mean"`` it moves to the pooled vector (``forward_head``),
        as timm's average-pooled ViTs (``fc_norm``) and Prov-GigaPath's global pool do."""
        return self.norm(h) if self.cfg.pool == Pool.cls else h

    def forward_features(
        self, x, coords, padding_mask=None, token_mask=None, center=None
    ) -> torch.Tensor:
        """``(B, 1+N, E)``: the CLS then the tile tokens after the last block (timm style).

        ``padding_mask`` True = padding; ``token_mask`` True = replace the token by the
        mask token (iBOT). With ``input_center`` the features are centred first: on
        ``center`` (B, in_dim), the mean tile feature of each input's *slide* (what the
        training crops carry), else on the input's own mean (a whole slide). After the final
        norm for ``pool="cls"``; before it for ``pool="mean"`` (see :meth:`forward_head`).
        """
        h, _, _ = self._trunk(x, coords, padding_mask, token_mask, center)
        return self._final_norm(h)

    def forward_tokens(
        self, x, coords, padding_mask=None, token_mask=None, center=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls (B, E), tokens (B, N, E))`` after the final norm, whatever the pooling:
        what self-distillation trains on (dinov2's ``x_norm_clstoken`` /
        ``x_norm_patchtokens``). Arguments as :meth:`forward_features`."""
        h, _, _ = self._trunk(x, coords, padding_mask, token_mask, center)
        out = self.norm(h)
        return out[:, 0], out[:, 1:]

    def last_block_attention(
        self, x, coords, padding_mask=None, center=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention (B, N), tokens (B, N, E))``: the last block's CLS-to-tile attention
        (``Block.cls_attention``: the dense softmax of the CLS query over the tile keys,
        averaged over heads, float32) and the tile tokens of :meth:`forward_tokens`.
        Arguments as :meth:`forward_features`; what the slide maps draw."""
        if not self.blocks:
            raise ValueError("encoder has no blocks: no attention to map")
        h, _, states = self._trunk(x, coords, padding_mask, None, center, {self.depth - 1})
        attention = self.blocks[-1].cls_attention(states[0], padding_mask)
        return attention, self.norm(h)[:, 1:]

    @property
    def packs(self) -> bool:
        """Whether :meth:`forward_packed` runs this architecture (global attention blocks
        only: no grid convolution, no neighbourhood blocks, no 2-D ALiBi)."""
        return (
            self.grid_context is None
            and not self.local_kernel
            and self.cfg.pos_bias == PosBias.none
        )

    def forward_packed(
        self, x, coords, lengths, token_mask=None, center=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_tokens` of ``S`` inputs packed into one token stream, no padding.

        ``x`` (T, in_dim) and ``coords`` (T, 2): the tiles of every input back to back,
        ``lengths[i]`` of them for input ``i`` (a list of ints, ``sum = T``; see
        :func:`pack_padded`); ``token_mask`` (T,) bool; ``center`` (S, in_dim). Each input
        gets its own CLS token and attends within itself exactly as it would alone, but
        every linear layer runs once on all ``T + S`` tokens and dilated attention makes one
        kernel call per distinct segment length for all inputs together (varlen). Drop-path
        draws once per input. Returns ``(cls (S, E), tokens (T, E))`` after the final norm.
        """
        if not self.packs:
            raise ValueError(
                "forward_packed needs an encoder of global attention blocks only "
                "(grid_context=0, local_kernel=0, pos_bias='none')"
            )
        lengths = [int(n) for n in lengths]
        t = sum(lengths)
        if x.ndim != 2 or x.shape != (t, self.in_dim) or coords.shape != (t, 2):
            raise ValueError(
                f"packed features must be (T, {self.in_dim}) and coords (T, 2) with T = "
                f"sum(lengths) = {t}; got {tuple(x.shape)} and {tuple(coords.shape)}"
            )
        if min(lengths, default=-1) < 0:
            raise ValueError(f"lengths must be >= 0, got {lengths}")
        if token_mask is not None and (token_mask.shape != (t,) or token_mask.dtype != torch.bool):
            raise ValueError(
                f"token_mask must be bool (T,) = ({t},), got {tuple(token_mask.shape)}"
            )
        n_in = len(lengths)
        reps = torch.as_tensor(lengths, device=x.device)
        spread = lambda c: c.repeat_interleave(reps, dim=0, output_size=t)  # noqa: E731
        center = None if center is None else spread(center)
        h = self._embed(x, coords, token_mask, center, lambda x: spread(segment_mean(x, lengths)))
        order, cls_rows, tile_rows = (i.to(x.device) for i in stream_index(tuple(lengths)))
        cls = self.cls_token[0].expand(n_in, -1).to(h.dtype)
        h = torch.cat([cls, h]).index_select(0, order)[None]  # (1, T + S, E): CLS, tiles, ...
        full = [n + 1 for n in lengths]
        for blk in self.blocks:
            h = self._block(blk, h, None, None, None, full)
        if self.encoder_norm is not None:
            h = self.encoder_norm(h)
        out = self.norm(h[0])
        return out.index_select(0, cls_rows), out.index_select(0, tile_rows)

    def forward_head(self, x, padding_mask=None, pre_logits: bool = False) -> torch.Tensor:
        """Slide vector ``(B, E)`` from :meth:`forward_features` output ``x``: the CLS
        (``pool="cls"``), or the final norm of the mean over real tile tokens
        (``pool="mean"``). There is no classifier: ``pre_logits`` is accepted for timm
        compatibility and changes nothing."""
        del pre_logits
        if self.cfg.pool == Pool.cls:
            return x[:, 0]
        return self.norm(_masked_mean(x[:, 1:], padding_mask)[:, 0])

    def forward_intermediates(
        self,
        x,
        coords,
        padding_mask=None,
        indices=None,
        norm: bool = False,
        intermediates_only: bool = False,
        include_input: bool = False,
    ):
        """Block outputs ``(B, 1+N, E)`` (timm style): ``indices`` an int (the last n
        blocks), a list of block indices (negatives count from the end) or None (all);
        ``norm`` applies the final norm as :meth:`forward_features` does, so that
        ``forward_head`` pools any of them like the last. ``include_input`` puts the block
        input (the token embedding) first. Returns ``(final, intermediates)``, or the list
        alone with ``intermediates_only``; ``final`` equals :meth:`forward_features`."""
        if indices is None:
            picked = list(range(self.depth))
        elif isinstance(indices, int):
            picked = list(range(self.depth - indices, self.depth))
        else:
            picked = [i + self.depth if i < 0 else i for i in indices]
        if any(not 0 <= i < self.depth for i in picked):
            raise ValueError(f"block indices {indices} out of range for depth {self.depth}")
        keep = {i + 1 for i in picked} | ({0} if include_input else set())
        h, _, states = self._trunk(x, coords, padding_mask, None, None, keep)
        by_pos = dict(zip(sorted(keep), states))
        out = ([by_pos[0]] if include_input else []) + [by_pos[i + 1] for i in picked]
        if norm:
            out = [self._final_norm(t) for t in out]
        return out if intermediates_only else (self._final_norm(h), out)

    def forward_regions(self, x, coords, regions, center=None) -> torch.Tensor:
        """The final CLS of each region of one slide, ``(R, E)``, with every tile's token
        computed once for the whole slide.

        ``x`` (N, in_dim), ``coords`` (N, 2) grid cells, ``regions`` a list of ``R`` index
        tensors into the N tiles. Needs an encoder whose blocks are all local: a tile's
        token then depends on its grid neighbourhood only (tiles never attend to a CLS), so
        one pass over the slide serves every region; CLS ``r`` attends to region ``r``'s
        tiles in every block. Equal to running each region alone wherever no tile's
        receptive field crosses the region's border and positions do not enter
        (``pos_mode="none"``). ``center``: as in :meth:`forward_features` (default: the
        slide's own mean).
        """
        if not self.blocks or not all(blk.local for blk in self.blocks):
            raise ValueError("forward_regions needs an encoder whose blocks are all local")
        if not regions:
            raise ValueError("forward_regions needs at least one region")
        self._check(x[None], coords[None], None, None)
        tiles = self._embed(x, coords, None, center, lambda x: x.mean(dim=0))
        if self.grid_context is not None:
            tiles = tiles + self.grid_context(tiles[None], coords[None])[0]
        members = torch.nn.utils.rnn.pad_sequence(list(regions), batch_first=True, padding_value=-1)
        valid = members >= 0
        members = members.clamp_min(0)
        cls = self.cls_token[0].expand(len(regions), -1).to(tiles.dtype)
        neighbours = grid_neighbours(coords[None], None, self.local_kernel)
        for blk in self.blocks:
            tiles, cls = blk.forward_split(tiles, cls, neighbours, members, valid, coords)
        if self.encoder_norm is not None:
            cls = self.encoder_norm(cls)
        return self.norm(cls)

    def forward(self, x, coords, padding_mask=None) -> torch.Tensor:
        """Slide embedding (B, E): CLS, or the token mean for ``pool="mean"``."""
        return self.forward_head(self.forward_features(x, coords, padding_mask), padding_mask)


READOUTS = ("cls", "mean")


def readout(encoder, x, coords, padding_mask=None, kind: str = "mean") -> torch.Tensor:
    """``(B, E)`` float32 slide vectors of a padded batch: the final CLS (``cls``) or the mean
    of the final (normed) tile tokens over each slide's real tiles (``mean``, the readout of
    the shipped recipes). What ``slidessl embed --pooling cls|mean`` and the pretraining's
    label-aware monitor read."""
    if kind not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {kind!r}")
    cls, tokens = encoder.forward_tokens(x, coords, padding_mask)
    if kind == "cls":
        return cls.float()
    if padding_mask is None:
        return tokens.float().mean(1)
    keep = (~padding_mask).unsqueeze(-1).float()
    return (tokens.float() * keep).sum(1) / keep.sum(1)


def _masked_mean(x: torch.Tensor, padding_mask) -> torch.Tensor:
    """(B, 1, D) mean over the real tokens of each input."""
    if padding_mask is None:
        return x.mean(dim=1, keepdim=True)
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1.0)


def build_encoder(name: str = "tiny", **overrides) -> SlideEncoder:
    """Build a preset (``tiny``, ``small``, ``base``, ``gigapath``) with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose from {sorted(PRESETS)}")
    return SlideEncoder(PRESETS[name], **overrides)
