"""A synthetic cohort of slides in TRIDENT layout, with labels of three kinds.

``make_cohort(out_dir, n_slides, seed)`` writes ``out_dir/slides/<slide_id>.h5`` (TRIDENT
layout: ``features`` float16 (N, D), ``coords`` int64 level-0 pixels with TRIDENT's
attributes, plus an extra ``tissue_type`` int8 dataset of ground truth) and
``out_dir/manifest.csv``. Deterministic from ``seed``. Labels (see ``docs/synthetic.md``):

- ``tumor_high``: composition (high vs low tumour fraction);
- ``infiltrated``: spatial arrangement at equal composition (immune cells inside vs
  around the tumour) - mean pooling of tile features is near chance on it;
- ``subtype``: multi-class strings (shifts the tumour tiles' features);
- ``EGFR, FAT1, KRAS, LRP1B, TP53``: weak, noisy 0/1 "mutations" tied to the above;
- ``normal_apart``: long-range arrangement at equal composition: the normal tissue lies in
  two foci far apart vs a few tiles apart (never closer than ``tissue.NORMAL_GAP``):
  invisible to mean pooling and to neighbour co-occurrence at smaller radii;
- ``os_months``, ``os_event``: overall survival (months, 1 = death / 0 = censored) from a
  Weibull hazard whose log is linear in the patient's tumour fraction (composition),
  immune infiltration inside the tumour (arrangement, protective) and ``normal_apart``
  (long range), with independent censoring (see :func:`survival_endpoint`).

Labels are drawn per patient; some patients have several slides.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from slidessl.data import tissue

MUTATIONS = ("EGFR", "FAT1", "KRAS", "LRP1B", "TP53")
SURVIVAL_COLUMNS = ("os_months", "os_event")
LABEL_COLUMNS = (
    ("tumor_high", "infiltrated", "subtype") + MUTATIONS + ("normal_apart",) + SURVIVAL_COLUMNS
)
# The survival endpoint (docs/synthetic.md): log hazard = SURV_TUMOR * (tumour fraction -
# SURV_TUMOR_MEAN) / SURV_TUMOR_SD + SURV_INFILTRATED * (infiltrated - 1/2) +
# SURV_APART * (normal_apart - 1/2); Weibull shape SURV_SHAPE, scale SURV_SCALE months;
# censoring times exponential with mean SURV_CENSOR_MEAN months (about 30% censored).
SURV_TUMOR, SURV_TUMOR_MEAN, SURV_TUMOR_SD = 0.5, 0.28, 0.125
SURV_INFILTRATED = -2.0
SURV_APART = 0.5
SURV_SHAPE, SURV_SCALE, SURV_CENSOR_MEAN = 1.5, 30.0, 80.0
DEFAULT_DIM = 128
TYPICAL_TILES = 3000


def _patient_sizes(n_slides: int, rng: np.random.Generator) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < n_slides:
        sizes.append(int(rng.choice([1, 2, 3], p=[0.7, 0.22, 0.08])))
    sizes[-1] -= sum(sizes) - n_slides
    return sizes


def _balanced(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def _mutation_probs(th: int, inf: int, sub: int, kras: int | None = None) -> dict[str, float]:
    adeno, squam = sub == 0, sub == 1
    return {
        "TP53": 0.75 if th else 0.25,  # composition
        "LRP1B": 0.70 if inf else 0.20,  # spatial arrangement
        "KRAS": 0.55 if adeno else 0.15,  # subtype
        "EGFR": 0.45 if (adeno and not kras) else 0.08,  # subtype, exclusive-ish with KRAS
        "FAT1": 0.55 if squam else 0.15,  # subtype
    }


def patient_labels(n_patients: int, rng: np.random.Generator) -> list[dict]:
    """Per-patient labels; binary and subtype labels balanced, mutations Bernoulli."""
    th = _balanced(n_patients, 2, rng)
    inf = np.zeros(n_patients, dtype=np.int64)
    for level in (0, 1):  # balanced within each composition class: equal composition by design
        idx = np.flatnonzero(th == level)
        inf[idx] = _balanced(len(idx), 2, rng)
    sub = _balanced(n_patients, len(tissue.SUBTYPES), rng)
    rows = []
    for i in range(n_patients):
        kras = int(rng.random() < _mutation_probs(th[i], inf[i], sub[i])["KRAS"])
        probs = _mutation_probs(th[i], inf[i], sub[i], kras)
        muts = {m: int(rng.random() < probs[m]) for m in MUTATIONS}
        muts["KRAS"] = kras
        rows.append(
            {
                "tumor_high": int(th[i]),
                "infiltrated": int(inf[i]),
                "subtype": int(sub[i]),
                "mutations": muts,
                "probs": probs,
            }
        )
    if n_patients >= 2:  # every mutation column holds both values
        for m in MUTATIONS:
            vals = [r["mutations"][m] for r in rows]
            if len(set(vals)) == 1:
                p = np.array([r["probs"][m] for r in rows])
                flip = int(np.argmin(p) if vals[0] == 1 else np.argmax(p))
                rows[flip]["mutations"][m] = 1 - vals[0]
    return rows


def survival_endpoint(
    tumor_fraction: np.ndarray,
    infiltrated: np.ndarray,
    normal_apart: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patient ``(os_months, os_event, log_hazard)``.

    ``log_hazard = SURV_TUMOR * z(tumour fraction) + SURV_INFILTRATED * (infiltrated - 1/2)
    + SURV_APART * (normal_apart - 1/2)``; the event time has the Weibull survival
    ``S(t) = exp(-(t / SURV_SCALE) ** SURV_SHAPE * exp(log_hazard))`` (proportional
    hazards), the censoring time is exponential with mean ``SURV_CENSOR_MEAN``, independent
    of everything else; the observed time is the smaller, rounded to 0.1 month."""
    z = (np.asarray(tumor_fraction, dtype=np.float64) - SURV_TUMOR_MEAN) / SURV_TUMOR_SD
    eta = (
        SURV_TUMOR * z
        + SURV_INFILTRATED * (np.asarray(infiltrated, dtype=np.float64) - 0.5)
        + SURV_APART * (np.asarray(normal_apart, dtype=np.float64) - 0.5)
    )
    u = 1.0 - rng.random(len(eta))  # (0, 1]
    event_time = SURV_SCALE * (-np.log(u) * np.exp(-eta)) ** (1.0 / SURV_SHAPE)
    censor_time = rng.exponential(SURV_CENSOR_MEAN, len(eta))
    time = np.round(np.minimum(event_time, censor_time), 1)
    event = (event_time <= censor_time).astype(np.int64)
    return np.maximum(time, 0.1), event, eta


def _tile_count(rng: np.random.Generator, min_tiles: int, max_tiles: int) -> int:
    lo, hi = np.log(min_tiles), np.log(max_tiles)
    centre = np.clip(np.log(TYPICAL_TILES), lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
    return int(np.exp(np.clip(rng.normal(centre, 0.15 * (hi - lo) + 0.05), lo, hi)))


def write_trident_h5(path: Path, features, coords, attrs: dict, extra: dict | None = None):
    """One slide in TRIDENT's layout (attributes on ``coords``)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v
        for k, v in (extra or {}).items():
            f.create_dataset(k, data=v)


def make_slide(space, labels: dict, rng, min_tiles: int, max_tiles: int, layout_rng=None):
    """Grid, tissue types, fp16 features and TRIDENT attributes of one slide.

    ``layout_rng`` (a generator of its own, so that every other draw is the same with or
    without it) places the normal tissue by ``labels["normal_apart"]``."""
    grid = tissue.tissue_grid(rng, _tile_count(rng, min_tiles, max_tiles), min_tiles, max_tiles)
    fractions = tissue.draw_fractions(bool(labels["tumor_high"]), rng)
    types = tissue.assign_types(grid, fractions, bool(labels["infiltrated"]), rng)
    if layout_rng is not None:
        types = tissue.place_normal(grid, types, bool(labels["normal_apart"]), layout_rng)
    feats = tissue.tile_features(space, types, labels["subtype"], rng).astype(np.float16)
    level0_mag = int(rng.choice([40, 20], p=[0.8, 0.2]))
    psl0 = 256 * level0_mag // 20
    origin = rng.integers(0, 40, 2) * 64
    # TRIDENT writes tiles contour by contour in raster order
    order = np.lexsort((grid[:, 0], grid[:, 1]))
    grid, types, feats = grid[order], types[order], feats[order]
    coords = grid * psl0 + origin
    attrs = {
        "patch_size": 256,
        "patch_size_level0": psl0,
        "level0_magnification": level0_mag,
        "target_magnification": 20,
        "overlap": 0,
        "level0_width": int(coords[:, 0].max() + psl0 + origin[0]),
        "level0_height": int(coords[:, 1].max() + psl0 + origin[1]),
    }
    return coords, types, feats, attrs, fractions


def make_cohort(
    out_dir,
    n_slides: int,
    seed: int = 0,
    dim: int = DEFAULT_DIM,
    min_tiles: int = 200,
    max_tiles: int = 20_000,
) -> Path:
    """Write a synthetic cohort and return the path of its ``manifest.csv``."""
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    space = tissue.make_feature_space(dim, np.random.default_rng([seed, 1]))
    prng = np.random.default_rng([seed, 2])
    sizes = _patient_sizes(n_slides, prng)
    plabels = patient_labels(len(sizes), prng)
    # drawn from a stream of their own: every earlier column and draw is unchanged
    apart = _balanced(len(sizes), 2, np.random.default_rng([seed, 5]))
    for lab, f in zip(plabels, apart):
        lab["normal_apart"] = int(f)
    rows, truth, patient_of = [], [], []
    index = 0
    for pid, (size, lab) in enumerate(zip(sizes, plabels)):
        patient = f"syn-p{pid:04d}"
        for k in range(size):
            rng = np.random.default_rng([seed, 3, index])
            coords, types, feats, attrs, fr = make_slide(
                space, lab, rng, min_tiles, max_tiles, np.random.default_rng([seed, 4, index])
            )
            sid = f"{patient}-s{k}"
            write_trident_h5(
                out / "slides" / f"{sid}.h5",
                feats,
                coords,
                attrs,
                extra={"tissue_type": types.astype(np.int8)},
            )
            row = {
                "slide_id": sid,
                "path": f"slides/{sid}.h5",
                "patient_id": patient,
                "tumor_high": lab["tumor_high"],
                "infiltrated": lab["infiltrated"],
                "subtype": tissue.SUBTYPES[lab["subtype"]],
                **lab["mutations"],
                "normal_apart": lab["normal_apart"],
            }
            rows.append(row)
            patient_of.append(pid)
            counts = np.bincount(types, minlength=len(tissue.TISSUE_TYPES)) / len(types)
            truth.append(
                {
                    "slide_id": sid,
                    "num_tiles": len(types),
                    **{
                        f"frac_{t}": round(float(c), 4) for t, c in zip(tissue.TISSUE_TYPES, counts)
                    },
                }
            )
            index += 1
    _add_survival(rows, truth, patient_of, plabels, np.random.default_rng([seed, 6]))
    _write_csv(out / "manifest.csv", rows)
    _write_csv(out / "truth.csv", truth)
    meta = {
        "generator": "slidessl.data.synthetic",
        "seed": seed,
        "n_slides": n_slides,
        "n_patients": len(sizes),
        "dim": dim,
        "min_tiles": min_tiles,
        "max_tiles": max_tiles,
        "tissue_types": list(tissue.TISSUE_TYPES),
        "label_columns": list(LABEL_COLUMNS),
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "manifest.csv"


def _add_survival(rows, truth, patient_of, plabels, rng) -> None:
    """``os_months`` / ``os_event`` per patient (its slides' mean true tumour fraction) from
    a stream of their own, so every other column and draw is unchanged; the true log hazard
    goes to ``truth.csv`` (the ceiling of any risk score)."""
    n = len(plabels)
    owner = np.asarray(patient_of)
    frac = np.array([t["frac_tumor"] for t in truth], dtype=np.float64)
    tumor = np.bincount(owner, frac, n) / np.maximum(np.bincount(owner, minlength=n), 1)
    time, event, eta = survival_endpoint(
        tumor,
        np.array([lab["infiltrated"] for lab in plabels]),
        np.array([lab["normal_apart"] for lab in plabels]),
        rng,
    )
    for row, t, p in zip(rows, truth, owner):
        row["os_months"], row["os_event"] = f"{time[p]:.1f}", int(event[p])
        t["log_hazard"] = round(float(eta[p]), 6)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
