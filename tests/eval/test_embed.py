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
    out = enc.forward_features(items[0]["features"][None], items[0]["grid"][None])
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
