"""The one-call GPU script must work before a paid GPU run: rehearse it on the CPU."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_completes_every_stage(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry"]) == 0
    text = capsys.readouterr().out
    assert "FAILED" not in text, text
    stages = ("== bench attention ==", "== bench encoder ==", "kernel LSE gradients", "profile")
    for stage in stages:
        assert stage in text
    summary = text.split("== summary ==")[1]
    assert "attention N=1024" in summary
    # eager rows of both LSE-gradient modes, each with a throughput and a utilisation
    assert summary.count("eager: ") == 2 and summary.count("eager kernel-lse: ") == 2
    assert "checkpointed N=512" in summary
