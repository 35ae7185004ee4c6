import numpy as np
import pytest

from slidessl.train.distributed import SlideShardSampler


@pytest.mark.parametrize("world,micro,accum", [(1, 2, 1), (2, 1, 2), (3, 2, 1), (2, 2, 2)])
def test_shards_partition_each_global_batch(world, micro, accum, rng):
    n = int(rng.integers(20, 50))
    gb = world * micro * accum
    samplers = [SlideShardSampler(n, gb, world, r, seed=7) for r in range(world)]
    single = SlideShardSampler(n, gb, 1, 0, seed=7)
    for epoch in (0, 1):
        for s in [*samplers, single]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        ref = list(single)
        assert all(len(p) == len(s) for p, s in zip(per_rank, samplers))
        steps = n // gb
        assert len(ref) == steps * gb
        per_step = gb // world
        for t in range(steps):
            got = sorted(i for p in per_rank for i in p[t * per_step : (t + 1) * per_step])
            assert got == sorted(ref[t * gb : (t + 1) * gb])
        assert len(set(ref)) == len(ref)
    samplers[0].set_epoch(0)
    e0 = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != e0  # reshuffled per epoch


def test_start_step_skips_done_steps():
    s = SlideShardSampler(40, 4, 2, 1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3 * 2 :]
    assert len(s) == len(full) - 6


def test_too_few_slides_is_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        SlideShardSampler(3, 4)


def test_order_is_a_permutation():
    s = SlideShardSampler(10, 1, seed=1)
    assert sorted(s.global_order().tolist()) == list(range(10))
    assert not np.array_equal(s.global_order(), np.arange(10))
