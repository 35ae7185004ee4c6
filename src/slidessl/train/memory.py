"""Peak memory of a pretraining step, estimated before the first step and checked against
what the device has (``train.memory_check``), so that a run which cannot fit says so and
names its knobs instead of being killed by the out-of-memory killer.

The estimate adds, for the largest micro-batch the data and the crop caps allow:

- **state**: student parameters, their gradients and AdamW's two moments, the teacher;
- **activations**: the bytes autograd saves per token in a student forward, *measured* on
  the actual encoder (``torch.autograd.graph.saved_tensors_hooks`` around two short probe
  forwards, parameters excluded; the slope per token), times the micro-batch's student
  tokens; with ``train.grad_checkpointing`` only what the checkpointed forward saves plus
  one block recomputed in backward; plus one block's worth for the backward's transients
  and for the teacher's no-grad forward;
- **heads**: the DINO CLS logits, and for iBOT the teacher's (M, K) probabilities of the
  M scored masked tokens (Sinkhorn-Knopp holds two more (M, K) tensors while it runs) and
  the student's per-chunk logits (``ibot.chunk_tokens``);
- **overhead**: the process and its DataLoader workers.

Example::

    est = estimate_step_memory(cfg, arch.student["backbone"], arch, max_slide_tiles=8192)
    print(est.describe())
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MemoryBudgetError",
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "estimate_step_memory",
    "saved_bytes_per_token",
]

log = logging.getLogger(__name__)
GIB = 2**30
_CHECK_MODES = ("error", "warn", "off")


class MemoryBudgetError(ValueError):
    """The estimated peak of a step exceeds the memory available (the message names knobs)."""


@dataclass
class MemoryEstimate:
    state: int
    activations: int
    heads: int
    overhead: int
    student_tokens: int  # per micro-batch
    masked_tokens: int  # scored by iBOT per micro-batch
    global_tiles: int  # largest global crop
    local_tiles: int  # largest local crop

    @property
    def total(self) -> int:
        return self.state + self.activations + self.heads + self.overhead

    def describe(self) -> str:
        return (
            f"{self.total / GIB:.1f} GiB (model + optimizer {self.state / GIB:.1f}, "
            f"activations {self.activations / GIB:.1f} for {self.student_tokens:,} student "
            f"tokens per micro-batch, heads {self.heads / GIB:.1f} for "
            f"{self.masked_tokens:,} masked tokens, process {self.overhead / GIB:.1f})"
        )


def _probe_grid(n: int, device) -> torch.Tensor:
    side = int(math.isqrt(n - 1)) + 1
    idx = torch.arange(n, device=device)
    return torch.stack([idx % side, idx // side], dim=-1).unsqueeze(0)


def saved_bytes_per_token(backbone, device, precision: str = "fp32", sizes=(128, 256)) -> float:
    """Bytes autograd keeps for backward per input token of one student forward, as the
    encoder is configured now (checkpointing included), parameters excluded; the slope
    between two probe lengths, so fixed costs (the CLS token, buffers) cancel. Runs in a
    forked RNG state: training randomness is not touched."""
    from slidessl.train.step import autocast_context

    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}

    def saved(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper tensors
                return t
            if st.data_ptr() not in params:
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            return t

        gen = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(1, n, int(backbone.in_dim), device=device, generator=gen)
        mask = torch.zeros(1, n, dtype=torch.bool, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast_context(torch.device(device), precision):
                out = backbone.forward_tokens(x, _probe_grid(n, device), token_mask=mask)
        del out
        return sum(storages.values())

    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        lo, hi = (saved(int(n)) for n in sizes)
    return max(hi - lo, 0) / (sizes[1] - sizes[0])


def _param_bytes(module) -> tuple[int, int]:
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return trainable, total


def _cap(*values) -> int:
    return int(min(v for v in values if v is not None))


def estimate_step_memory(cfg: dict, backbone, arch, max_slide_tiles: int, world_size: int = 1):
    """:class:`MemoryEstimate` of one micro-batch step of ``cfg`` on slides of at most
    ``max_slide_tiles`` tiles (after ``data.max_tiles``)."""
    from slidessl.data.views import MultiCropConfig

    c = MultiCropConfig.from_dict(cfg["crops"])
    t = cfg["train"]
    device = next(backbone.parameters()).device
    slide = _cap(max_slide_tiles, cfg["data"]["max_tiles"])
    window = _cap(slide, c.region_max_tiles)
    g_tiles = _cap(window, c.global_max_tiles)
    l_tiles = _cap(window, c.local_max_tiles) if c.n_local else 0
    batch = int(t["batch_size"])
    tokens = batch * (c.n_global * (g_tiles + 1) + c.n_local * (l_tiles + 1))
    if float(cfg.get("arrange", {}).get("loss_weight", 0.0)) > 0:
        tokens += batch * c.n_global * (g_tiles + 1)  # the shuffled global crops' student pass
    teacher_tokens = batch * c.n_global * (g_tiles + 1)

    trainable, total = _param_bytes(arch.student)
    _, teacher = _param_bytes(arch.teacher)
    state = total + 3 * trainable + teacher  # params, grads, AdamW exp_avg / exp_avg_sq
    if cfg["distributed"]["strategy"] == "fsdp" and world_size > 1:
        state //= world_size

    precision = str(t["precision"])
    per_token = saved_bytes_per_token(backbone, device, precision)
    depth = max(len(getattr(backbone, "blocks", [])), 1)
    if getattr(backbone, "grad_checkpointing", False):
        # the checkpointed forward's saved inputs are what the probe measured; backward
        # recomputes one block at a time
        was = backbone.grad_checkpointing
        backbone.grad_checkpointing = False
        try:
            block = saved_bytes_per_token(backbone, device, precision) / depth
        finally:
            backbone.grad_checkpointing = was
        per_token_kept = per_token + block
    else:
        block = per_token / depth
        per_token_kept = per_token
    # + 10% allocator slack (fragmentation, the slides' own arrays): measured peaks of the
    # shipped recipes sit at 0.75-1.02 of the estimate without it (docs/training.md)
    activations = int(1.1 * (per_token_kept * tokens + block * (tokens + teacher_tokens)))

    d_k = int(cfg["dino"]["out_dim"])
    heads = 4 * 4 * batch * (c.n_global + c.n_local) * d_k  # CLS logits, probs, grads
    masked = 0
    if float(cfg["ibot"]["loss_weight"]) > 0:
        per_crop = int(round(g_tiles * c.mask_ratio[1]))
        cap = cfg["ibot"].get("max_masked_per_crop")
        if cap:
            per_crop = min(per_crop, int(cap))
        masked = batch * c.n_global * per_crop
        k = int(cfg["ibot"]["out_dim"])
        chunk = min(masked, int(cfg["ibot"].get("chunk_tokens") or masked))
        # teacher probs kept + two (M, K) Sinkhorn / softmax temporaries; student chunk:
        # logits, log-softmax and their gradients
        heads += int(1.1 * (3 * 4 * masked * k + 4 * 4 * chunk * k))
    workers = int(cfg["data"]["num_workers"]) if device.type == "cpu" else 0
    overhead = int((0.6 + 0.3 * workers) * GIB) if device.type == "cpu" else int(0.5 * GIB)
    return MemoryEstimate(
        int(state), activations, int(heads), overhead, tokens, masked, g_tiles, l_tiles
    )


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device) -> tuple[int | None, str]:
    """Bytes this process may use in all (what it holds now included) and where that comes
    from; ``(None, why)`` when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        return int(free + held), f"free on {torch.cuda.get_device_name(device)}"
    rss = _proc_kib("/proc/self/status", "VmRSS") or 0
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    limits = []
    if avail is not None:
        limits.append((avail + rss, "available system memory"))
    cg_max, cg_now = (_read_int(f"/sys/fs/cgroup/memory.{k}") for k in ("max", "current"))
    if cg_max is not None and cg_now is not None:
        limits.append((cg_max - cg_now + rss, "the cgroup's memory limit"))
    if not limits:
        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            limits.append((pages * size, "physical memory"))
        except (ValueError, OSError, AttributeError):
            return None, "no /proc/meminfo or sysconf"
    return min(limits)


def _knobs(cfg: dict, est: MemoryEstimate) -> str:
    c, t = cfg["crops"], cfg["train"]
    items = [
        f"crops.global_max_tiles / crops.local_max_tiles (largest crops now {est.global_tiles}"
        f" / {est.local_tiles} tiles), or data.max_tiles",
        f"train.batch_size (now {t['batch_size']}; raise train.accum_steps to keep the "
        "optimizer-step batch)",
    ]
    if not t.get("grad_checkpointing"):
        items.append("train.grad_checkpointing=true (keeps one block's activations)")
    if t["precision"] != "bf16":
        items.append("train.precision=bf16")
    items.append(f"dino.out_dim (now {cfg['dino']['out_dim']})")
    if est.masked_tokens:
        items.append(
            f"ibot.out_dim (now {cfg['ibot']['out_dim']}), ibot.max_masked_per_crop or "
            f"crops.mask_ratio (now {c.get('mask_ratio', '[0.1, 0.5]')})"
        )
    return "; ".join(items)


def check_memory(cfg: dict, arch, max_slide_tiles: int, world_size: int = 1):
    """Estimate the step's peak and compare it with the memory available
    (``train.memory_budget_gb`` overrides what the machine reports). ``train.memory_check``:
    ``error`` raises :class:`MemoryBudgetError` naming the knobs, ``warn`` logs it, ``off``
    skips the check. Returns the estimate (``None`` when off)."""
    t = cfg["train"]
    mode = str(t.get("memory_check", "error"))
    if mode not in _CHECK_MODES:
        raise ValueError(f"train.memory_check must be one of {_CHECK_MODES}, got {mode!r}")
    if mode == "off":
        return None
    backbone = arch.student["backbone"]
    est = estimate_step_memory(cfg, backbone, arch, max_slide_tiles, world_size)
    device = next(backbone.parameters()).device
    if t.get("memory_budget_gb") is not None:
        budget, where = int(float(t["memory_budget_gb"]) * GIB), "train.memory_budget_gb"
    else:
        budget, where = available_memory(device)
    log.info("pretrain: estimated peak memory per step %s", est.describe())
    if budget is None:
        log.info("pretrain: memory check skipped (%s)", where)
        return est
    if est.total > budget:
        msg = (
            f"pretrain: a step needs an estimated {est.describe()}, more than the "
            f"{budget / GIB:.1f} GiB of {where} on {device.type}. Lower it with: "
            f"{_knobs(cfg, est)}. train.memory_check=warn runs anyway."
        )
        if mode == "error":
            raise MemoryBudgetError(msg)
        log.warning(msg)
    return est
