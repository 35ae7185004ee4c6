"""--resume without a checkpoint for this strategy says what is there."""

from types import SimpleNamespace

import torch

from slidessl.train.checkpoint import save_checkpoint
from slidessl.train.loop import _no_checkpoint
from slidessl.train.sharded_checkpoint import STATE_FILE

SINGLE = SimpleNamespace(world_size=1, distributed=False)
DDP = SimpleNamespace(world_size=2, distributed=True)
FOUR = SimpleNamespace(world_size=4, distributed=True)


def _dcp_folder(root, step, complete=True):
    """The files that make a DCP checkpoint folder count as complete (content not read)."""
    folder = root / (f"ckpt-{step:08d}" + ("" if complete else ".tmp"))
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    if complete:
        (folder / STATE_FILE).write_bytes(b"")
    return folder


def test_dcp_folders_resumed_as_one_process_or_ddp(tmp_path):
    root = tmp_path / "checkpoints"
    _dcp_folder(root, 4)
    _dcp_folder(root, 10)
    msg = _no_checkpoint(root, fsdp=False, ctx=SINGLE)
    assert msg.startswith(f"--resume: no checkpoint in {root}: it holds FSDP checkpoints")
    assert "the newest ckpt-00000010/" in msg
    assert "distributed.strategy=fsdp, at any number of processes" in msg
    assert "this run: 1 process(es), strategy single process" in msg
    assert "strategy ddp" in _no_checkpoint(root, fsdp=False, ctx=DDP)


def test_fsdp_from_a_whole_checkpoint_and_an_empty_folder(tmp_path):
    root = tmp_path / "checkpoints"
    assert _no_checkpoint(root, True, DDP) == f"--resume: no checkpoint in {root}"
    save_checkpoint({"x": torch.zeros(1)}, root, step=5)
    msg = _no_checkpoint(root, True, FOUR)
    assert "ckpt-00000005.pt of a single-process / DDP run" in msg
    assert "distributed.strategy=ddp" in msg and "this run: 4 process(es), strategy fsdp" in msg


def test_old_rank_shards_and_an_unfinished_save(tmp_path):
    root = tmp_path / "checkpoints"
    _dcp_folder(root, 7, complete=False)
    msg = _no_checkpoint(root, True, DDP)
    assert msg.endswith("only ckpt-00000007.tmp/, a save that a killed run did not finish")
    for r in range(2):
        save_checkpoint({"x": torch.zeros(1)}, root / f"rank{r}", step=10)
    msg = _no_checkpoint(root, True, FOUR)
    assert "per-rank FSDP shards (rank0, rank1)" in msg
    assert "resumes FSDP from ckpt-*/ folders only" in msg
