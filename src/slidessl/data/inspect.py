"""``slidessl inspect``: what is in a slide file, a manifest or a folder, and what is wrong.

Per slide: tiles, feature dim, dtype, the stride used and its source, grid extent, fill
ratio (tiles / extent cells) and problems. Errors (the slide cannot be used) and notes (it
can, but look) are kept apart; the command exits non-zero when any slide has an error.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slidessl.data.errors import SlideError
from slidessl.data.formats import SLIDE_EXTENSIONS, open_slide
from slidessl.data.manifest import Manifest, load_manifest


@dataclass
class SlideReport:
    slide_id: str
    path: str
    tiles: int = 0
    dim: int = 0
    dtype: str = ""
    source_format: str = ""
    stride: float = 0.0
    stride_source: str = ""
    extent: tuple[int, int] = (0, 0)
    fill: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def inspect_slide(
    path, *, slide_id=None, stride=None, stride_source="option", scan=True
) -> SlideReport:
    """Open one slide and collect its facts and problems (never raises for a bad slide)."""
    path = Path(path)
    report = SlideReport(slide_id or path.stem, str(path))
    try:
        rec = open_slide(path, slide_id=slide_id, stride=stride, stride_source=stride_source)
    except SlideError as exc:
        report.errors.append(exc.problem)
        return report
    w, h = (rec.grid.max(axis=0) + 1).tolist()
    report.tiles, report.dim, report.dtype = rec.num_tiles, rec.feature_dim, rec.dtype
    report.source_format, report.stride, report.stride_source = (
        rec.source_format,
        rec.stride,
        rec.stride_source,
    )
    report.extent, report.fill = (w, h), rec.num_tiles / (w * h)
    if rec.stride_source == "inferred":
        report.notes.append("stride inferred from coordinate gaps (no patch_size_level0)")
    step = math.gcd(
        *np.diff(np.unique(rec.grid[:, 0])).tolist(), *np.diff(np.unique(rec.grid[:, 1])).tolist()
    )
    if step > 1:
        report.notes.append(
            f"all grid gaps are multiples of {step}: stride may be {step}x too small"
        )
    if scan:
        try:
            bad = rec.scan_nonfinite()
        except SlideError as exc:
            report.errors.append(exc.problem)
            return report
        if bad.size:
            report.errors.append(f"{bad.size} of {rec.num_tiles} tiles hold NaN/Inf features")
    return report


def inspect_manifest(manifest: Manifest, *, stride=None, scan=True) -> list[SlideReport]:
    reports = []
    for e in manifest.entries:
        s, src = (e.stride, "manifest") if e.stride else (stride, "option")
        reports.append(
            inspect_slide(e.path, slide_id=e.slide_id, stride=s, stride_source=src, scan=scan)
        )
    dims = Counter(r.dim for r in reports if r.ok)
    if len(dims) > 1:
        common = dims.most_common(1)[0][0]
        for r in reports:
            if r.ok and r.dim != common:
                r.errors.append(f"feature dim {r.dim} differs from the dataset's {common}")
    return reports


def inspect_path(path, *, stride=None, scan=True) -> tuple[list[SlideReport], Manifest | None]:
    """A slide file, a manifest file, or a folder (its manifest, else its slide files)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in SLIDE_EXTENSIONS:
        return [inspect_slide(path, stride=stride, scan=scan)], None
    manifest = load_manifest(path)
    return inspect_manifest(manifest, stride=stride, scan=scan), manifest


def _row(r: SlideReport) -> str:
    status = "ok" if r.ok else "ERROR"
    facts = (
        f"{r.tiles:>7} {r.dim:>5} {r.dtype:<9} {r.source_format:<8} "
        f"{r.stride:>7g} {r.stride_source:<9} {r.extent[0]:>4}x{r.extent[1]:<4} {r.fill:>5.2f}"
    )
    if not r.ok and r.tiles == 0 and r.dim == 0:  # rejected before its facts were read
        facts = f"{'-':>7} {'-':>5} {'-':<9} {'-':<8} {'-':>7} {'-':<9} {'-':>9} {'-':>5}"
    line = f"{r.slide_id:<28} {status:<5} {facts}"
    return "\n".join(
        [line] + [f"    error: {e}" for e in r.errors] + [f"    note: {n}" for n in r.notes]
    )


def format_reports(reports: list[SlideReport], manifest: Manifest | None, all_rows=False) -> str:
    header = (
        f"{'slide_id':<28} {'':<5} {'tiles':>7} {'dim':>5} {'dtype':<9} {'format':<8} "
        f"{'stride':>7} {'source':<9} {'extent':>9} {'fill':>5}"
    )
    shown = reports if all_rows or len(reports) <= 50 else [r for r in reports if not r.ok]
    lines = [header] + [_row(r) for r in shown]
    if len(shown) < len(reports):
        lines.append(f"({len(reports) - len(shown)} slides without errors not shown; use --all)")
    if manifest is not None:
        lines += ["", *summarise(reports, manifest)]
    return "\n".join(lines)


def summarise(reports: list[SlideReport], manifest: Manifest) -> list[str]:
    good = [r for r in reports if r.ok]
    tiles = np.array([r.tiles for r in good]) if good else np.zeros(1)
    patients = Counter(e.patient_id for e in manifest.entries)
    out = [
        f"slides: {len(reports)} ({len(good)} ok, {len(reports) - len(good)} with errors); "
        f"patients: {len(patients)} (max {max(patients.values())} slides per patient)",
        f"tiles per slide: min {tiles.min():.0f}, median {np.median(tiles):.0f}, "
        f"max {tiles.max():.0f}, total {tiles.sum():.0f}",
        f"feature dims: {dict(Counter(r.dim for r in good))}; "
        f"dtypes: {dict(Counter(r.dtype for r in good))}; "
        f"stride sources: {dict(Counter(r.stride_source for r in good))}",
    ]
    for col in manifest.label_columns:
        counts = Counter(manifest.labels(col))
        missing = counts.pop("", 0)
        top = ", ".join(f"{k}: {v}" for k, v in counts.most_common(6))
        more = f" (+{len(counts) - 6} more)" if len(counts) > 6 else ""
        out.append(f"label {col}: {top}{more}" + (f"; missing: {missing}" if missing else ""))
    return out


def reports_as_dicts(reports: list[SlideReport]) -> list[dict]:
    return [{**asdict(r), "ok": r.ok} for r in reports]
