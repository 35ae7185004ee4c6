"""`slidessl bench attention|encoder` run end to end at toy sizes."""

import pytest
import torch

from slidessl.bench.attention import bench_attention
from slidessl.bench.encoder import encoder_flops
from slidessl.cli import main
from slidessl.models.encoder import build_encoder


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bench_attention_cli_prints_ratio_table(capsys):
    assert (
        main(
            [
                "bench",
                "attention",
                "--n",
                "64,128",
                "--dim",
                "32",
                "--heads",
                "2",
                "--repeats",
                "1",
                "--dense-limit",
                "1e-9",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "matmul peak" in text and "dense/gp" in text
    assert "dense skipped for N=[128]" in text  # the limit forces the estimate


def test_bench_attention_rows_are_consistent():
    rows = bench_attention([96], dim=32, heads=2, repeats=1, out=lambda *_: None)
    r = rows[0]
    assert r["n"] == 96 and r["dense_s"] > 0 and r["gigapath_s"] > 0
    assert 0 < r["dense_frac"] and 0 < r["default_frac"]


def test_bench_encoder_cli(capsys):
    assert (
        main(
            [
                "bench",
                "encoder",
                "--preset",
                "tiny",
                "--n",
                "64",
                "--mem-n",
                "32,64",
                "--no-warmup",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "tokens/s" in text and "checkpointing on" in text


def test_bench_encoder_packed_step_row():
    """--packed-step adds one row per N: the 10 crops of a step in one packed stream, with
    the model FLOPs of every crop."""
    from slidessl.bench.encoder import bench_encoder, encoder_flops, packed_step_lengths

    lines = []
    rows, _ = bench_encoder(
        "tiny", [64], [], "float32", "cpu", 1, out=lines.append, warmup=False, packed_step=True
    )
    packed = [r for r in rows if r["mode"] == "packed"]
    assert len(packed) == 1 and packed[0]["batch"] == 10
    assert packed_step_lengths(64) == [64, 64] + [16] * 8
    eager = [r for r in rows if r["mode"] == "eager"][0]
    enc = build_encoder("tiny")
    # MFU x time is FLOPs / peak, one peak for both rows: the FLOP ratio of the two rows
    ratio = (packed[0]["mfu"] * packed[0]["sec"]) / (eager["mfu"] * eager["sec"])
    flops = sum(encoder_flops(enc, m) for m in packed_step_lengths(64))
    assert abs(ratio - flops / encoder_flops(enc, 64)) < 1e-9 * ratio
    assert packed[0]["tokens_per_s"] == sum(packed_step_lengths(64)) / packed[0]["sec"]
    assert any("packed" in line for line in lines)


def test_encoder_flops_counts_linear_and_attention():
    enc = build_encoder("tiny", attention="dense", depth=1, embed_dim=64, mlp_dim=128)
    n = 99
    tokens = n + 1
    linear = 2 * tokens * (4 * 64 * 64 + 2 * 64 * 128) + 2 * n * 64 * 64
    attn = 4 * tokens * tokens * 64
    assert encoder_flops(enc, n) == 3 * (linear + attn)


def test_bench_defaults_depend_on_the_device():
    """The CPU defaults are the short ones (about two minutes on two cores); CUDA keeps the
    long sequence lengths; an explicit --n is never replaced."""
    import argparse

    from slidessl.bench import commands

    args = argparse.Namespace(n=None, mem_n=None)
    commands._default(args, "n", "encoder_n", "cpu")
    commands._default(args, "mem_n", "encoder_mem_n", "cuda:0")
    assert args.n == [1024, 2048] and args.mem_n == [4096, 8192, 16384, 32768]
    args = argparse.Namespace(n=[64])
    commands._default(args, "n", "attention_n", "cpu")
    assert args.n == [64]
