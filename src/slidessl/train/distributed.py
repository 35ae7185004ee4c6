"""Process groups, slide sharding and model wrapping for ``torchrun`` scale-out.

``init_distributed`` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins a process group (NCCL on GPU,
gloo on CPU). Without them it returns a single-process context and nothing is initialised.

The sampler shards a per-epoch permutation of the slides so that optimizer step ``t`` of a
run with ``W`` processes, micro-batch ``b`` and ``k`` accumulation steps sees exactly the
slides ``perm[t*W*b*k : (t+1)*W*b*k]`` -- the same global batch as one process with
micro-batch ``W*b`` (that is what the scale-out equivalence test checks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "SlideShardSampler",
    "init_distributed",
    "maybe_no_sync",
    "wrap_model",
]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def local_world_size(self) -> int:
        """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if self.distributed else 1

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(
    device: str = "auto", backend: str = "auto", timeout_minutes: float = 30
) -> DistContext:
    """Join the torchrun process group if launched by torchrun, else run single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    initialised_here = False
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={world} but {var} is not set; launch with torchrun "
                    "(see docs/distributed.md)"
                )
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        initialised_here = True
    return DistContext(rank, world, local_rank, dev, backend, initialised_here)


class SlideShardSampler(torch.utils.data.Sampler[int]):
    """Shards a per-epoch permutation of ``n`` slides across ranks; full global batches only.

    ``steps_per_epoch * global_batch`` indices are used each epoch (``global_batch = world *
    micro_batch * accum``); rank ``r`` takes every ``world``-th of them. ``start_step`` skips
    the optimizer steps already done in this epoch (resume mid-epoch).
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by world {world_size}")
        full = n // global_batch
        if full < 1:
            raise ValueError(
                f"{n} slides cannot fill one global batch of {global_batch} "
                "(world_size x train.batch_size x train.accum_steps); lower the batch"
            )
        self.n, self.global_batch, self.world, self.rank = n, global_batch, world_size, rank
        self.seed, self.shuffle = int(seed), shuffle
        self.steps_per_epoch = full if steps_per_epoch is None else min(int(steps_per_epoch), full)
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def global_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        used = self.global_order()[: self.steps_per_epoch * self.global_batch]
        mine = used[self.rank :: self.world]
        per_rank_step = self.global_batch // self.world
        return iter(mine[self.start_step * per_rank_step :].tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch // self.world)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def wrap_model(arch: nn.Module, ctx: DistContext, cfg: dict) -> nn.Module:
    """Wrap the meta-architecture for data parallelism.

    ``ddp``: DistributedDataParallel over the whole meta-arch (only the student has trainable
    parameters; buffers are not broadcast, so each rank keeps its own pending centre sums).
    ``fsdp``: FSDP2 ``fully_shard`` on every encoder block and on each student/teacher part,
    with the same layout for student and teacher so the EMA update works shard by shard.
    """
    if not ctx.distributed:
        return arch
    d = cfg["distributed"]
    if d["strategy"] == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # FSDP2 warns (4x per step) that a wrapped encoder returns views (its CLS and tile
        # tokens are slices of one (B, 1 + N, E) tensor): an in-place op on such a view
        # would skip the pre-backward all-gather. Nothing in slidessl writes to an encoder's
        # outputs in place (the heads, losses and readouts only read them; test_distributed
        # checks FSDP's gradients against a single process), so the warning is silenced
        # here, for this message only.
        warnings.filterwarnings(
            "ignore",
            message=r"FSDP2-wrapped module .* returned a view tensor",
            category=UserWarning,
        )

        for part in (arch.student, arch.teacher):
            for module in part.values():
                for block in getattr(module, "blocks", []):
                    fully_shard(block)
                fully_shard(module)
                for method in ("forward_features", "forward_tokens", "forward_packed"):
                    if hasattr(module, method):
                        register_fsdp_forward_method(module, method)
        return arch
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        arch,
        device_ids=device_ids,
        broadcast_buffers=False,
        find_unused_parameters=bool(d["find_unused_parameters"]),
    )


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP ``no_sync`` / FSDP2
    ``set_requires_gradient_sync``); gradients sync on the last micro-step only."""
    if sync:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    sharded = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)
