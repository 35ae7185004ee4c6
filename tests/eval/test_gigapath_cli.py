"""``slidessl embed gigapath:PATH`` gives Prov-GigaPath's own slide embeddings.

The equivalence tests (``published`` fixture: skipped unless torchscale-gml 0.2.3 and einops
are installed) build the published ``LongNetViT`` on random weights
(``tests/published_gigapath.py``), save it as ``{"model": state_dict}``, write slides as
Prov-GigaPath h5 files (``features`` (N, 1536), ``coords`` px at the tiling level, rows in
the order the pipeline writes them), run the CLI and compare against
``run_inference_with_slide_encoder``'s outputs: max |cli - published| / max |published|.
The other tests need no reference package.
"""

import csv
import zlib

import h5py
import numpy as np
import pytest
import torch

from slidessl.cli import main
from slidessl.eval.embed_io import read_embeddings
from slidessl.models.encoder import build_encoder

TOL = 1e-4


@pytest.fixture
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode()) & 0xFFFF
    print(f"seed {s} ({request.node.nodeid})")
    return s


@pytest.fixture
def published(monkeypatch):
    pytest.importorskip("einops")
    pytest.importorskip("torchscale")
    import published_gigapath as pg

    pg.use_flash_math(monkeypatch)
    return pg


def _tiles(rng, n, origin_tiles, offset_px, order):
    """``n`` tiles of a blob on the 256-px grid, coords in px at the tiling level with the
    tiling's origin ``origin_tiles * 256 + offset_px``; rows as the pipeline lists them:
    ``sorted`` tile names (``{x:05d}x_{y:05d}y.png``, i.e. by x then y) or ``listdir``
    (arbitrary: a seeded permutation)."""
    side = int(np.ceil(np.sqrt(n * 1.6)))
    cells = rng.choice(side * side, size=n, replace=False)
    grid = np.stack([cells // side, cells % side], 1)
    grid -= grid.min(0)  # a tile on the tiling's first row and column
    coords = (grid + np.asarray(origin_tiles)) * 256 + np.asarray(offset_px)
    if order == "sorted":
        rows = sorted(range(n), key=lambda i: f"{coords[i, 0]:05d}x_{coords[i, 1]:05d}y.png")
    else:
        rows = rng.permutation(n)
    return coords[np.asarray(rows)]


def _write_gigapath_h5(path, features, coords, coords_dtype=np.int64):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        f.create_dataset("coords", data=np.asarray(coords).astype(coords_dtype))


def _manifest(folder, names, strides=None):
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path"] + (["stride"] if strides else []))
        for i, name in enumerate(names):
            w.writerow([name, f"{name}.h5"] + ([strides[i]] if strides else []))
    return path


def _embed(ckpt, manifest, out, *extra):
    return main(["embed", f"gigapath:{ckpt}", str(manifest), "--out", str(out), *extra])


def _cli(ckpt, manifest, out, pooling):
    assert _embed(ckpt, manifest, out, "--pooling", pooling) == 0
    ids, emb, attrs = read_embeddings(out)
    assert attrs["convention"] == "prov-gigapath" and attrs["pooling"] == pooling
    return dict(zip(ids, emb))


def _rel(got, expect):
    expect = np.asarray(expect, dtype=np.float64).reshape(-1)
    return float(np.abs(np.asarray(got, np.float64) - expect).max() / np.abs(expect).max())


def _cohort(pg, tmp_path, seed, depth, width, slides):
    """Random published model + slides ``(name, n, origin_tiles, offset_px, order)``;
    returns the checkpoint, the manifest and the pipeline outputs of every slide."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = pg.PublishedLongNetViT(1536, width, depth).randomize(g)
    ckpt = tmp_path / "slide_encoder.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    expect = {}
    for name, n, origin, offset, order in slides:
        coords = _tiles(rng, n, origin, offset, order)
        features = rng.standard_normal((n, 1536)).astype(np.float32)
        _write_gigapath_h5(tmp_path / f"{name}.h5", features, coords)
        # what a pipeline user passes: the h5 arrays as tensors, coords as float
        tile_embeds, c = torch.from_numpy(features), torch.from_numpy(coords).float()
        expect[name] = model.pipeline(tile_embeds, c)
    return ckpt, _manifest(tmp_path, [s[0] for s in slides]), expect


@pytest.mark.reference
@pytest.mark.slow
def test_cli_equals_published_pipeline_small_depth(tmp_path, published, seed):
    """3 layers x 128: slides of 1,024 (at origin), 2,500 and 4,096 tiles (offset by a few
    tiles and a fraction of one), rows sorted by tile name or in listdir order; every
    pooling against the pipeline's named outputs."""
    slides = [
        ("origin_1024", 1024, (0, 0), (0, 0), "sorted"),
        ("offset_2500", 2500, (3, 5), (45, 101), "listdir"),
        ("offset_4096", 4096, (7, 2), (200, 17), "sorted"),
    ]
    ckpt, manifest, expect = _cohort(published, tmp_path, seed, 3, 128, slides)
    cases = {
        "cls": lambda e: e[False]["last_layer_embed"],
        "mean": lambda e: e[True]["last_layer_embed"],
        "layers:0,1,2,3": lambda e: torch.cat([e[False][f"layer_{i}_embed"] for i in range(4)], -1),
        "mean-layers:0,-1": lambda e: torch.cat(
            [e[True]["layer_0_embed"], e[True]["layer_3_embed"]], -1
        ),
        "forward-cls": lambda e: e["forward"][False],
    }
    for pooling, pick in cases.items():
        got = _cli(ckpt, manifest, tmp_path / f"{pooling.replace(':', '_')}.h5", pooling)
        for name, _n, *_ in slides:
            rel = _rel(got[name], pick(expect[name]))
            print(f"depth 3 {pooling:>16} {name}: max rel err {rel:.2e}")
            assert rel <= TOL, (pooling, name, rel)


@pytest.mark.reference
@pytest.mark.slow
def test_cli_equals_published_pipeline_depth12(tmp_path, published, seed):
    """The released architecture (gigapath_slide_enc12l768d): CLS and global pool of a
    1,030-tile slide offset from the tiling origin, rows in listdir order."""
    slides = [("offset_1030", 1030, (4, 9), (81, 230), "listdir")]
    ckpt, manifest, expect = _cohort(published, tmp_path, seed, 12, 768, slides)
    for pooling, global_pool in (("cls", False), ("mean", True)):
        got = _cli(ckpt, manifest, tmp_path / f"{pooling}.h5", pooling)
        rel = _rel(got["offset_1030"], expect["offset_1030"][global_pool]["last_layer_embed"])
        print(f"depth 12 {pooling}: max rel err {rel:.2e}")
        assert rel <= TOL


# ---------------------------------------------------------------- no reference package


def _tiny_checkpoint(path, seed, in_dim=1536):
    """A published-format slide_encoder.pth (1 layer x 32) with random weights."""
    torch.manual_seed(seed)
    enc = build_encoder("gigapath", depth=1, embed_dim=32, mlp_dim=64, in_dim=in_dim)
    state = {}
    for k, v in enc.state_dict().items():
        if k == "mask_token":
            continue
        k = k.replace("patch_embed.", "patch_embed.proj.").replace("blocks.", "encoder.layers.")
        state[k.replace("encoder_norm.", "encoder.layer_norm.")] = v + 0.05 * torch.randn_like(v)
    torch.save({"model": state}, path)
    return path


def test_trident_and_clam_files_map_their_tile_step_onto_the_256_px_unit(tmp_path, seed, caplog):
    """The same tiles as a Prov-GigaPath file (px at 20x), a TRIDENT file (level-0 px at 40x,
    ``patch_size_level0`` 512) and a CLAM file (int32 level-0 px, stride from the manifest)
    give the same vectors; the log says which rule each used."""
    rng = np.random.default_rng(seed)
    ckpt = _tiny_checkpoint(tmp_path / "se.pth", seed)
    coords = _tiles(rng, 300, (6, 2), (100, 30), "listdir")
    features = rng.standard_normal((300, 1536)).astype(np.float32)
    _write_gigapath_h5(tmp_path / "gp.h5", features, coords)
    level0 = coords * 2  # 40x level 0
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f.create_dataset("features", data=features)
        d = f.create_dataset("coords", data=level0.astype(np.int64))
        d.attrs.update(patch_size=256, patch_size_level0=512, level0_magnification=40)
    _write_gigapath_h5(tmp_path / "clam.h5", features, level0, np.int32)
    manifest = _manifest(tmp_path, ["gp", "trident", "clam"], strides=["", "", "512"])
    with caplog.at_level("INFO", logger="slidessl.eval.gigapath_embed"):
        got = _cli(ckpt, manifest, tmp_path / "emb.h5", "cls")
    np.testing.assert_allclose(got["trident"], got["gp"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["clam"], got["gp"], rtol=0, atol=1e-6)
    assert "Prov-GigaPath coords (px at the tiling level): positions floor(coords / 256)" in (
        caplog.text
    )
    assert "trident coords: one tile step of 512 coordinate units (patch_size_level0)" in (
        caplog.text
    )
    assert "clam coords: one tile step of 512 coordinate units (the manifest's stride)" in (
        caplog.text
    )
    # no origin shift: the same slide moved by whole tiles is another embedding
    _write_gigapath_h5(tmp_path / "gp.h5", features, coords + 256 * 3)
    moved = _cli(ckpt, _manifest(tmp_path, ["gp"]), tmp_path / "moved.h5", "cls")
    assert np.abs(moved["gp"] - got["gp"]).max() > 1e-3


def test_positions_outside_the_table_are_refused_unless_extrapolated(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    ckpt = _tiny_checkpoint(tmp_path / "se.pth", seed)
    coords = _tiles(rng, 50, (995, 3), (0, 0), "sorted")  # x reaches past 1000 tiles
    _write_gigapath_h5(tmp_path / "wide.h5", rng.standard_normal((50, 1536)), coords)
    manifest = _manifest(tmp_path, ["wide"])
    capsys.readouterr()
    assert _embed(ckpt, manifest, tmp_path / "a.h5") == 2
    err = capsys.readouterr().err
    assert "wide.h5" in err and "outside Prov-GigaPath's 1000 x 1000" in err
    assert "--gigapath-extrapolate" in err
    assert _embed(ckpt, manifest, tmp_path / "b.h5", "--gigapath-extrapolate") == 0
    _, emb, attrs = read_embeddings(tmp_path / "b.h5")
    assert np.isfinite(emb).all() and attrs["extrapolate"] == 1


def test_bad_inputs_resume_and_skip(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    ckpt = _tiny_checkpoint(tmp_path / "se.pth", seed)
    for name, n in (("a", 40), ("b", 70)):
        coords = _tiles(rng, n, (1, 1), (0, 0), "sorted")
        _write_gigapath_h5(tmp_path / f"{name}.h5", rng.standard_normal((n, 1536)), coords)
    _write_gigapath_h5(tmp_path / "narrow.h5", rng.standard_normal((30, 64)), coords[:30])
    good = _manifest(tmp_path, ["a", "b"])
    out = tmp_path / "emb.h5"
    first = _cli(ckpt, good, out, "layers:-1,0")
    assert first["a"].shape == (64,)
    capsys.readouterr()
    assert _embed(ckpt, good, out, "--pooling", "layers:-1,0") == 0  # resumed: nothing to do
    assert "embedded 0 slides (2 already there)" in capsys.readouterr().out
    assert _embed(ckpt, good, out, "--pooling", "cls") == 2
    assert "pooling='layers:-1,0', not 'cls'" in capsys.readouterr().err
    with h5py.File(out, "a") as f:  # a file written by the earlier, non-faithful gigapath path
        del f.attrs["convention"]
    assert _embed(ckpt, good, out, "--pooling", "layers:-1,0") == 2
    assert "convention=None, not 'prov-gigapath'" in capsys.readouterr().err
    for pooling, message in (("layers:5", r"layer\(s\) \[5\] do not exist"), ("max", "unknown")):
        assert _embed(ckpt, good, tmp_path / "x.h5", "--pooling", pooling) == 2
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    mixed = _manifest(tmp_path, ["a", "narrow", "b"])
    assert _embed(ckpt, mixed, tmp_path / "y.h5") == 2
    err = capsys.readouterr().err
    assert "narrow.h5" in err and "takes 1536-dim tile features" in err
    assert _embed(ckpt, mixed, tmp_path / "y.h5", "--skip-bad") == 0
    assert "skipped narrow" in capsys.readouterr().out
    ids, _, _ = read_embeddings(tmp_path / "y.h5")
    assert sorted(ids) == ["a", "b"]
