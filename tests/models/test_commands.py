"""`slidessl bench attention|encoder` run end to end at toy sizes."""

import pytest
import torch

from slidessl.bench import bench_attention, encoder_flops
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

    from slidessl.models import commands

    args = argparse.Namespace(n=None, mem_n=None)
    commands._default(args, "n", "encoder_n", "cpu")
    commands._default(args, "mem_n", "encoder_mem_n", "cuda:0")
    assert args.n == [1024, 2048] and args.mem_n == [4096, 8192, 16384, 32768]
    args = argparse.Namespace(n=[64])
    commands._default(args, "n", "attention_n", "cpu")
    assert args.n == [64]
