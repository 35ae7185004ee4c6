import pytest

from slidessl.atomic import atomic_write, atomic_write_bytes


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, rng):
    target = tmp_path / "sub" / "state.bin"
    old = rng.bytes(1000)
    atomic_write_bytes(target, old)

    def dies(handle):
        handle.write(rng.bytes(500))
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(target, dies)
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]

    new = rng.bytes(2000)
    atomic_write_bytes(target, new)
    assert target.read_bytes() == new
