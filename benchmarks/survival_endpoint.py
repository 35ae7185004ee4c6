"""The synthetic survival endpoint's censoring rate and C-index ceilings (docs/synthetic.md).

For several cohort seeds at the demo's size, per patient: the share censored, Harrell's
C-index of the true log hazard (the ceiling of any risk score) and of each property of the
hazard alone (tumour fraction, infiltration, normal_apart); then the same at a large size
from ``survival_endpoint`` directly (the population values). Prints mean ± std over seeds.

    python benchmarks/survival_endpoint.py [--seeds 0,1,2,3,4] [--slides 180]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np

from slidessl.data.synthetic import make_cohort, survival_endpoint
from slidessl.eval.survival import harrell_cindex, per_patient


def cohort_row(seed: int, slides: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_cohort(Path(tmp), slides, seed=seed, dim=8, min_tiles=200, max_tiles=600)
        rows = list(csv.DictReader(manifest.open()))
        truth = {r["slide_id"]: r for r in csv.DictReader((manifest.parent / "truth.csv").open())}
    pids = [r["patient_id"] for r in rows]
    y = np.array([[float(r["os_months"]), float(r["os_event"])] for r in rows])

    def c(values) -> float:
        _, t, e, risk = per_patient(pids, y, np.asarray(values, dtype=float))
        return harrell_cindex(t, e, risk)

    _, _, e, _ = per_patient(pids, y, np.zeros(len(rows)))
    return {
        "patients": float(len(e)),
        "censored": float(1 - e.mean()),
        "ceiling (true log hazard)": c([float(truth[r["slide_id"]]["log_hazard"]) for r in rows]),
        "tumour fraction alone": c([float(truth[r["slide_id"]]["frac_tumor"]) for r in rows]),
        "infiltrated alone": c([-float(r["infiltrated"]) for r in rows]),
        "normal_apart alone": c([float(r["normal_apart"]) for r in rows]),
    }


def population_row(seed: int, n: int = 3000) -> dict[str, float]:
    rng = np.random.default_rng([seed, 99])
    high = rng.random(n) < 0.5
    tumor = np.where(high, rng.uniform(0.26, 0.5, n), rng.uniform(0.06, 0.3, n))
    inf, apart = rng.integers(0, 2, n), rng.integers(0, 2, n)
    t, e, eta = survival_endpoint(tumor, inf, apart, rng)
    return {
        "patients": float(n),
        "censored": float(1 - e.mean()),
        "ceiling (true log hazard)": harrell_cindex(t, e, eta),
        "tumour fraction alone": harrell_cindex(t, e, tumor),
        "infiltrated alone": harrell_cindex(t, e, -inf.astype(float)),
        "normal_apart alone": harrell_cindex(t, e, apart.astype(float)),
    }


def _print(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print("| quantity | mean ± std over seeds |")
    print("| --- | --- |")
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        print(f"| {key} | {v.mean():.3f} ± {v.std(ddof=1):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--slides", type=int, default=180)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    _print(
        f"synthetic cohorts of {args.slides} slides (seeds {args.seeds}), per patient",
        [cohort_row(s, args.slides) for s in seeds],
    )
    _print("population (3,000 patients per seed)", [population_row(s) for s in seeds])


if __name__ == "__main__":
    main()
