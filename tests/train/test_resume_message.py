"""--resume without a checkpoint for this strategy / world size says what is there."""

from types import SimpleNamespace

import torch

from slidessl.train.checkpoint import save_checkpoint
from slidessl.train.loop import _no_checkpoint


def test_fsdp_shards_resumed_as_one_process_or_ddp(tmp_path):
    root = tmp_path / "checkpoints"
    for r in range(2):
        save_checkpoint({"x": torch.zeros(1)}, root / f"rank{r}", step=10)
    single = SimpleNamespace(world_size=1, distributed=False)
    msg = _no_checkpoint(root, root, fsdp=False, ctx=single)
    assert "FSDP shards (rank0, rank1) of a 2-process run" in msg
    assert "distributed.strategy=fsdp and 2 processes" in msg and "this run: 1" in msg
    ddp = SimpleNamespace(world_size=2, distributed=True)
    assert "strategy ddp" in _no_checkpoint(root, root, fsdp=False, ctx=ddp)
    four = SimpleNamespace(world_size=4, distributed=True)
    msg = _no_checkpoint(root, root / "rank3", fsdp=True, ctx=four)
    assert "FSDP shards of 2 processes" in msg and "this run: 4 processes" in msg


def test_fsdp_from_a_whole_checkpoint_and_an_empty_folder(tmp_path):
    root = tmp_path / "checkpoints"
    two = SimpleNamespace(world_size=2, distributed=True)
    msg = _no_checkpoint(root, root / "rank0", True, two)
    assert msg.endswith(f"no checkpoint in {root}/rank0")
    save_checkpoint({"x": torch.zeros(1)}, root, step=5)
    msg = _no_checkpoint(root, root / "rank0", True, two)
    assert "ckpt-00000005.pt" in msg and "not from a single-process / DDP checkpoint" in msg
