"""Progress bars that suit both a terminal and a log file.

On a terminal a tqdm bar redraws as usual. When stderr is not a terminal (a SLURM or nohup
log, CI), every redraw is a new line in the file, so the bar updates at most every
``LOG_INTERVAL_S`` seconds there (tqdm's ``mininterval``/``maxinterval``) and without
dynamic width. ``SLIDESSL_PROGRESS_INTERVAL`` overrides the interval (seconds).

Example::

    for item in progress(items, desc="embed"):
        ...
"""

from __future__ import annotations

import os
import sys

__all__ = ["LOG_INTERVAL_S", "progress"]

LOG_INTERVAL_S = 30.0


def _interactive() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, throttled when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not _interactive():
        interval = float(os.environ.get("SLIDESSL_PROGRESS_INTERVAL", LOG_INTERVAL_S))
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, 10.0))
        kwargs["dynamic_ncols"] = False
    return tqdm(iterable, **kwargs)
