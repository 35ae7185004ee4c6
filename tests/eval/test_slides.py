"""Slides read through DataLoader workers give what the dataset gives in this process, in the
order asked; a slide that fails only when read is skipped or raised here as without
workers; every embedder's file attributes are what its interface says."""

import numpy as np
import pytest
import torch

from slidessl.data.dataset import SlideDataset
from slidessl.data.errors import SlideError
from slidessl.data.synthetic import write_trident_h5
from slidessl.eval.embed import from_spec, run_embed
from slidessl.eval.embed_io import read_embeddings
from slidessl.eval.slides import read_slides


def _cohort(tmp_path, rng, nan_slide=None, n=5):
    lines = ["slide_id,path"]
    for i in range(n):
        k = int(rng.integers(60, 200))
        side = int(np.ceil(np.sqrt(k))) + 2
        cells = rng.choice(side * side, k, replace=False)
        coords = np.stack([cells % side, cells // side], 1) * 256
        feats = rng.standard_normal((k, 6)).astype(np.float32)
        if i == nan_slide:
            feats[:, 2] = np.nan  # seen only when the features are read (any subsample)
        write_trident_h5(tmp_path / f"s{i}.h5", feats, coords, {"patch_size_level0": 256})
        lines.append(f"s{i},{tmp_path / f's{i}.h5'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


@pytest.mark.parametrize("workers", [0, 1])
def test_read_slides_keeps_order_and_handles_bad_slides_here(tmp_path, rng, workers):
    manifest = _cohort(tmp_path, rng, nan_slide=3)
    ds = SlideDataset(manifest, max_tiles=50, on_bad_slide="skip", seed=2, cap_key="slide_id")
    batches = [[4, 0], [3, 1], [2]]
    with pytest.warns(UserWarning, match="skipping slide 's3'"):
        got = list(read_slides(ds, batches, workers))
    assert [[it["index"] for it in b] for b in got] == [[4, 0], [1], [2]]
    assert [sid for sid, _ in ds.skipped] == ["s3"] and "NaN/Inf" in ds.skipped[0][1]
    for it in (it for b in got for it in b):
        want = ds.load(it["index"])
        assert torch.equal(it["features"], want["features"]) and torch.equal(
            it["grid"], want["grid"]
        )
    strict = SlideDataset(manifest, max_tiles=50, seed=2)
    with pytest.raises(SlideError, match=r"s3\.h5.*NaN/Inf"):
        list(read_slides(strict, [[i] for i in range(5)], workers))


def test_workers_do_not_change_a_vector_and_bad_reads_are_listed(tmp_path, rng):
    manifest = _cohort(tmp_path, rng, nan_slide=1)
    runs = {}
    for workers in (0, 1):
        out = tmp_path / f"w{workers}.h5"
        with pytest.warns(UserWarning, match="skipping slide 's1'"):
            s = run_embed("random", manifest, out, "mean", max_tiles=80, batch_size=2, seed=1,
                          on_bad_slide="skip", progress=False, workers=workers)  # fmt: skip
        assert s["written"] == 4 and [sid for sid, _ in s["bad_slides"]] == ["s1"]
        runs[workers] = read_embeddings(out)
    assert runs[0][0] == runs[1][0] and runs[0][1].tobytes() == runs[1][1].tobytes()
    with pytest.raises(SlideError, match=r"s1\.h5"):
        run_embed("random", manifest, tmp_path / "e.h5", progress=False, workers=1)


@pytest.mark.parametrize("spec", ["meanpool", "random:tiny", "cooc:4"])
def test_file_attributes_are_the_embedders(tmp_path, rng, spec):
    manifest = _cohort(tmp_path, rng)
    out = tmp_path / "e.h5"
    run_embed(spec, manifest, out, seed=3, progress=False)
    _, X, attrs = read_embeddings(out)
    emb = from_spec(spec, seed=3)
    emb.prepare(emb.open(manifest, emb.auto_max_tiles, 3, "error"))
    assert attrs["spec"] == emb.key and attrs["encoder"] == emb.description
    assert attrs["encoder_digest"] == emb.digest and attrs["pooling"] == emb.pooling
    assert attrs["pooling"] == ("mean" if spec.startswith("random") else "none")
