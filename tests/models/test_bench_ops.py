"""benchmarks/bench_ops.py: the packed multi-crop step runs each linear layer once."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ops.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_packed_step_runs_each_layer_once(monkeypatch):
    """Crops of two lengths in one packed stream: 4 linear layers forward (q/k/v fused,
    out, fc1, fc2), where the padded globals + locals calls run 8, and fewer operators in
    all; the attention calls do not double with the second length."""
    from slidessl.models import attention

    monkeypatch.setattr(attention, "SMALL_N_BIAS_ELEMENTS", 0)  # the plan at toy sizes too
    bench = _load()
    packed, padded = bench.count_step((600, 600), (150,) * 4, preset="tiny")
    assert packed["aten::linear"] == 4 and padded["aten::linear"] == 8
    assert sum(packed.values()) < sum(padded.values())
    attn = [sum(v for k, v in ops.items() if "scaled_dot_product" in k) for ops in (packed, padded)]
    assert 0 < attn[0] <= attn[1]
    single = bench.count(601, preset="tiny")
    assert single["aten::linear"] == 4
