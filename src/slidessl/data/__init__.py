"""Data layer: slide files -> validated records -> integer grids -> capped, ordered items.

Public names (see ``docs/internals.md``): :func:`open_slide`, :class:`SlideRecord`,
:class:`SlideError`, :func:`load_manifest`, :class:`SlideDataset`, :func:`make_cohort`,
and the grid helpers :func:`to_grid`, :func:`spatial_order`, :func:`cap_tiles`.
"""

from __future__ import annotations

from slidessl.data.errors import ManifestError, SlideError
from slidessl.data.formats import SlideRecord, open_slide
from slidessl.data.grid import cap_tiles, spatial_order, to_grid
from slidessl.data.manifest import Manifest, ManifestEntry, load_manifest

__all__ = [
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "SlideDataset",
    "SlideError",
    "SlideRecord",
    "cap_tiles",
    "load_manifest",
    "make_cohort",
    "open_slide",
    "spatial_order",
    "to_grid",
]


def __getattr__(name):  # torch-importing names load on first use
    if name == "SlideDataset":
        from slidessl.data.dataset import SlideDataset

        return SlideDataset
    if name == "make_cohort":
        from slidessl.data.synthetic import make_cohort

        return make_cohort
    raise AttributeError(f"module 'slidessl.data' has no attribute {name!r}")
