"""The list of slides: a CSV/TSV manifest, or a folder scanned for slide files.

Manifest columns: ``slide_id``, ``path`` (relative to the manifest's folder, or absolute),
optional ``patient_id`` (aliases ``case_id``, ``pat_id``; defaults to the slide id),
optional ``stride`` (tile stride in coordinate units, used when the file has no
``patch_size_level0`` attribute) and any label columns, kept as raw strings ("" = missing).
Problems are collected and reported together: every duplicate id and every missing file.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from slidessl.data.errors import ManifestError
from slidessl.data.readers import SLIDE_EXTENSIONS

PATIENT_COLUMNS = ("patient_id", "case_id", "pat_id")
RESERVED = ("slide_id", "path", "stride")
MANIFEST_NAMES = ("manifest.csv", "manifest.tsv")
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
# Preference when one slide id exists in several containers (CLAM keeps h5 and pt).
_EXT_RANK = {ext: i for i, ext in enumerate(SLIDE_EXTENSIONS)}


@dataclass
class ManifestEntry:
    slide_id: str
    path: Path
    patient_id: str
    labels: dict[str, str]
    stride: float | None = None


@dataclass
class Manifest:
    entries: list[ManifestEntry]
    label_columns: list[str]
    source: Path | None = None
    slide_dir: Path | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i: int) -> ManifestEntry:
        return self.entries[i]

    def labels(self, column: str) -> list[str]:
        """Raw label strings of one column, in entry order."""
        if column not in self.label_columns:
            raise KeyError(f"no label column {column!r}; have {self.label_columns}")
        return [e.labels[column] for e in self.entries]


def default_patient(slide_id: str) -> str:
    """Patient of a slide without a patient column: TCGA barcode prefix, else the slide id."""
    m = _TCGA_PATIENT.match(slide_id)
    return m.group(1).upper() if m else slide_id


def _delimiter(path: Path, header: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    if "\t" in header and "," not in header:
        return "\t"
    return ","


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"cannot read manifest: {exc}"]) from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ManifestError(path, ["empty manifest (no header line)"])
    reader = csv.reader(lines, delimiter=_delimiter(path, lines[0]))
    header = [h.strip() for h in next(reader)]
    rows, problems = [], []
    for lineno, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.append(f"line {lineno}: {len(cells)} fields, header has {len(header)}")
            continue
        rows.append((lineno, {h: c.strip() for h, c in zip(header, cells)}))
    if problems:
        raise ManifestError(path, problems)
    return header, rows


def _parse_stride(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def read_manifest_file(path: Path, *, check_files: bool = True) -> Manifest:
    header, rows = _read_table(path)
    dupes_in_header = [h for h, k in Counter(header).items() if k > 1]
    missing = [c for c in ("slide_id", "path") if c not in header]
    if missing or dupes_in_header:
        problems = [f"missing column {c!r} (header: {header})" for c in missing]
        problems += [f"column {c!r} appears more than once" for c in dupes_in_header]
        raise ManifestError(path, problems)
    patient_col = next((c for c in PATIENT_COLUMNS if c in header), None)
    skip = set(RESERVED) | ({patient_col} if patient_col else set())
    label_columns = [h for h in header if h not in skip]
    problems: list[str] = []
    entries: list[ManifestEntry] = []
    for lineno, row in rows:
        sid, rel = row["slide_id"], row["path"]
        if not sid or not rel:
            problems.append(f"line {lineno}: empty slide_id or path")
            continue
        file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        try:
            stride = _parse_stride(row.get("stride", ""))
        except ValueError:
            problems.append(f"line {lineno}: stride {row['stride']!r} is not a positive number")
            stride = None
        patient = row[patient_col] if patient_col and row[patient_col] else default_patient(sid)
        labels = {c: row[c] for c in label_columns}
        entries.append(ManifestEntry(sid, file, patient, labels, stride))
    if not entries and not problems:
        problems.append("no slides listed")
    counts = Counter(e.slide_id for e in entries)
    problems += [f"duplicate slide_id {s!r} ({k} rows)" for s, k in counts.items() if k > 1]
    if check_files:
        problems += [
            f"missing file for {e.slide_id!r}: {e.path}" for e in entries if not e.path.is_file()
        ]
    if problems:
        raise ManifestError(path, problems)
    return Manifest(entries, label_columns, path)


def scan_folder(folder: Path) -> Manifest:
    """Every slide file under ``folder`` (recursive); the slide id is the file stem."""
    files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in SLIDE_EXTENSIONS]
    files = [p for p in files if p.is_file()]
    if not files:
        raise ManifestError(folder, [f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) found"])
    by_id: dict[str, list[Path]] = {}
    for p in files:
        by_id.setdefault(p.stem, []).append(p)
    problems, entries = [], []
    for sid, paths in by_id.items():
        best = min(_EXT_RANK[p.suffix.lower()] for p in paths)
        chosen = [p for p in paths if _EXT_RANK[p.suffix.lower()] == best]
        if len(chosen) > 1:
            where = ", ".join(str(p.relative_to(folder)) for p in chosen)
            problems.append(f"duplicate slide_id {sid!r}: {where}")
            continue
        entries.append(ManifestEntry(sid, chosen[0], default_patient(sid), {}))
    if problems:
        raise ManifestError(folder, problems)
    return Manifest(entries, [], None, slide_dir=folder)


def load_manifest(path_or_folder, *, check_files: bool = True) -> Manifest:
    """A manifest file, a folder holding ``manifest.csv``/``.tsv``, or a folder of slides."""
    path = Path(path_or_folder)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return read_manifest_file(path / name, check_files=check_files)
        return scan_folder(path)
    if not path.exists():
        raise ManifestError(path, ["no such manifest file or folder"])
    if path.suffix.lower() in SLIDE_EXTENSIONS:
        raise ManifestError(path, ["this is a slide file, not a manifest (pass its folder)"])
    return read_manifest_file(path, check_files=check_files)
