import numpy as np
import pytest
import torch

from slidessl.eval.embed import build_embedder, embed_batch, embed_items, parse_pooling


def slides(rng, n=5, d=12):
    out = []
    for i in range(n):
        k = int(rng.integers(5, 40))
        side = int(np.ceil(np.sqrt(k)))
        cells = rng.choice(side * side, k, replace=False)
        grid = np.stack([cells % side, cells // side], axis=1)
        out.append(
            {
                "slide_id": f"s{i}",
                "features": torch.randn(k, d),
                "grid": torch.as_tensor(grid, dtype=torch.long),
            }
        )
    return out


@pytest.mark.parametrize(
    "pooling,width", [("cls", 1), ("mean", 1), ("pooled", 1), ("layers:-1,-2", 2)]
)
def test_poolings_shapes_and_batch_invariance(rng, pooling, width):
    items = slides(rng)
    enc, desc = build_embedder("random:tiny", 12, seed=1)
    assert desc == "random:tiny:seed1" and not enc.training
    ids, batched = embed_items(enc, items, pooling, batch_size=5)
    assert batched.shape == (5, 64 * width)
    single = np.concatenate([embed_batch(enc, [it], pooling) for it in items])
    order = [ids.index(it["slide_id"]) for it in items]
    np.testing.assert_allclose(batched[order], single, atol=1e-4)


def test_mean_pooling_and_meanpool_baseline(rng):
    items = slides(rng)
    enc, _ = build_embedder("random:tiny", 12, seed=0)
    out = {"tokens": enc.forward_tokens(items[0]["features"][None], items[0]["grid"][None])[1]}
    np.testing.assert_allclose(
        embed_batch(enc, items[:1], "mean")[0], out["tokens"][0].mean(0).detach().numpy(), atol=1e-5
    )
    none, desc = build_embedder("meanpool", 12)
    assert none is None and desc == "meanpool"
    np.testing.assert_allclose(
        embed_batch(None, items[:2], "cls"),
        np.stack([it["features"].mean(0).numpy() for it in items[:2]]),
        atol=1e-6,
    )


def test_random_encoder_is_seeded_and_errors_are_clear(rng):
    a, _ = build_embedder("random:tiny", 12, seed=3)
    b, _ = build_embedder("random:tiny", 12, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="neither a preset"):
        build_embedder("random:nope", 12)
    with pytest.raises(ValueError, match="unknown pooling"):
        parse_pooling("max")
    with pytest.raises(ValueError, match="tile features have dim 7"):
        embed_batch(a, slides(rng, 1, 7), "cls")


def test_regions_of_tiles_the_grid():
    from slidessl.eval.embed import regions_of

    g = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(6), indexing="xy"), -1)
    g = g.reshape(-1, 2) + 3
    groups = regions_of(g, 4, min_tiles=1)
    assert sorted(torch.cat(groups).tolist()) == list(range(60))  # a partition
    for r in groups:  # each group inside one 4 x 4 cell of the shifted grid
        cell = torch.div(g[r], 4, rounding_mode="floor")  # cells at multiples of 4
        assert (cell == cell[0]).all()
    # x 3..12, y 3..8 meet 4 x 3 cells; the 4 corner cells hold one tile (< 2): dropped
    assert len(regions_of(g, 4)) == 8
    assert len(regions_of(g[:3], 8, min_tiles=5)) == 1  # none qualifies: the whole slide


@pytest.mark.parametrize("local", [True, False])
def test_region_pooling_is_the_mean_region_cls(rng, local):
    """`regions:S`: the mean CLS over the regions of the four half-offset tilings; an
    all-local encoder computes tiles once (forward_regions), any other runs each region."""
    from slidessl.eval.embed import region_embedding, regions_of
    from slidessl.models import build_encoder

    kw = dict(local_kernel=3, local_depth=2, pos_mode="none") if local else {}
    enc = build_encoder("tiny", in_dim=12, attention="dense", input_center=True, **kw).eval()
    item = slides(rng, 1)[0]
    g = item["grid"]
    with torch.no_grad():
        got = region_embedding(enc, item, 4)
        groups = [
            r for s in ((0, 0), (2, 0), (0, 2), (2, 2)) for r in regions_of(g + torch.tensor(s), 4)
        ]
        center = item["features"].mean(0)
        if local:
            want = enc.forward_regions(item["features"], g, groups, center).mean(0)
        else:
            want = torch.stack(
                [
                    enc.forward_tokens(
                        item["features"][r][None],
                        (g[r] - g[r].min(0).values)[None],
                        center=center[None],
                    )[0][0]
                    for r in groups
                ]
            ).mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        two = embed_batch(enc, [item], "regions:4,8")
        assert two.shape == (1, 128)
        np.testing.assert_allclose(two[0, :64], got.numpy(), rtol=1e-5, atol=1e-5)
    assert parse_pooling("regions:8,24") == ("regions", [8, 24])
    with pytest.raises(ValueError, match="unknown pooling"):
        parse_pooling("regions:0")
