import numpy as np
import pytest

from slidessl.eval.embed_io import EmbeddingWriter, existing_ids, read_embeddings


def test_h5_round_trip_with_awkward_ids_and_append(tmp_path, rng):
    path = tmp_path / "e.h5"
    ids = ["a/b", "c%2Fd", "plain"]
    X = rng.standard_normal((3, 7)).astype(np.float32)
    with EmbeddingWriter(path, {"encoder": "x", "pooling": "cls"}) as w:
        w.write(ids[:2], X[:2])
    with EmbeddingWriter(path, {"encoder": "x", "pooling": "cls"}) as w:
        w.write(ids[2:], X[2:])
    got_ids, got, attrs = read_embeddings(path)
    order = [got_ids.index(s) for s in ids]
    np.testing.assert_array_equal(got[order], X)
    assert existing_ids(path) == set(ids) and attrs["encoder"] == "x"


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_embeddings(tmp_path / "none.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.h5: cannot read embeddings"):
        read_embeddings(bad)
    with EmbeddingWriter(tmp_path / "nan.h5", {}) as w:
        w.write(["s"], np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="nan.h5: non-finite embeddings for slides"):
        read_embeddings(tmp_path / "nan.h5")


def test_parquet_round_trip(tmp_path, rng):
    pytest.importorskip("pyarrow")
    path = tmp_path / "e.parquet"
    X = rng.standard_normal((4, 5)).astype(np.float32)
    with EmbeddingWriter(path, {"encoder": "x"}) as w:
        w.write([f"s{i}" for i in range(4)], X)
    ids, got, attrs = read_embeddings(path)
    assert ids == [f"s{i}" for i in range(4)] and attrs["encoder"] == "x"
    np.testing.assert_array_equal(got, X)


def test_parquet_resume_keeps_earlier_slides_and_writes_atomically(tmp_path, rng, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "e.parquet"
    first = rng.standard_normal((2, 3)).astype(np.float32)
    with EmbeddingWriter(path, {"encoder": "x"}) as w:
        w.write(["a", "b"], first)
    before = path.read_bytes()
    real_write = pq.write_table

    def dies_halfway(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise OSError("killed while writing")

    w = EmbeddingWriter(path, {"encoder": "x"})
    w.write(["c"], rng.standard_normal((1, 3)).astype(np.float32))
    monkeypatch.setattr(pa.parquet, "write_table", dies_halfway)
    with pytest.raises(OSError, match="killed while writing"):
        w.close()
    assert path.read_bytes() == before  # the earlier slides are intact
    assert [p.name for p in tmp_path.iterdir()] == ["e.parquet"]  # no temp file left
    monkeypatch.setattr(pa.parquet, "write_table", real_write)
    w.close()  # a retry writes all three
    ids, got, _ = read_embeddings(path)
    assert ids == ["a", "b", "c"]
    np.testing.assert_array_equal(got[:2], first)
