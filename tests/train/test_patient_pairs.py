"""data.patient_pairs: positives across slides of one patient."""

import numpy as np
import pytest
import torch

from slidessl.data.dataset import SlideDataset
from slidessl.data.synthetic import make_cohort
from slidessl.train.data import CropDataset, build_multicrop


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    manifest = make_cohort(root, n_slides=16, seed=4, dim=8, min_tiles=60, max_tiles=120)
    return SlideDataset(manifest, max_tiles=None)


def _crops(n_local=4):
    return build_multicrop({"n_local": n_local, "global_min_tiles": 8, "local_min_tiles": 4})


def _source(crop, slide):
    """Whether every feature row of ``crop`` is a row of ``slide``'s features."""
    feats = slide["features"]
    return all(bool((feats == row).all(1).any()) for row in crop["features"])


def test_pairs_take_later_crops_from_another_slide_of_the_patient(slides):
    ds = CropDataset(slides, _crops(), seed=1, patient_pairs=1.0)
    patients = [e.patient_id for e in slides.entries]
    multi = [i for i, p in enumerate(patients) if patients.count(p) > 1]
    assert multi, "the cohort needs a patient with several slides"
    for i in multi:
        views = ds[i]
        other = views["paired_with"]
        j = slides.slide_ids.index(other)
        assert other != slides.slide_ids[i] and patients[j] == patients[i]
        a, b = slides[i], slides[j]
        assert _source(views["global"][0], a) and _source(views["global"][1], b)
        assert all(_source(c, a) for c in views["local"][:2])
        assert all(_source(c, b) for c in views["local"][2:])
        # each crop is centred on its own slide's mean
        torch.testing.assert_close(
            views["global"][1]["center"], b["features"].double().mean(0).float()
        )


def test_single_slide_patients_and_p0_are_unchanged(slides):
    plain = CropDataset(slides, _crops(), seed=1)
    paired = CropDataset(slides, _crops(), seed=1, patient_pairs=1.0)
    zero = CropDataset(slides, _crops(), seed=1, patient_pairs=0.0)
    patients = [e.patient_id for e in slides.entries]
    for i in range(len(slides)):
        a, c = plain[i], zero[i]
        assert "paired_with" not in a and "paired_with" not in c
        for x, y in zip(a["global"] + a["local"], c["global"] + c["local"]):
            assert torch.equal(x["features"], y["features"])
        if patients.count(patients[i]) == 1:
            b = paired[i]
            assert "paired_with" not in b
            for x, y in zip(a["global"], b["global"]):
                assert torch.equal(x["features"], y["features"])
    with pytest.raises(ValueError, match="patient_pairs"):
        CropDataset(slides, _crops(), seed=1, patient_pairs=1.5)
    assert np.isclose(paired.patient_pairs, 1.0)
