"""Errors of the data layer. Every message names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class SlideError(ValueError):
    """A slide file that cannot be used; ``.path`` is the file, ``.problem`` the reason."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ManifestError(ValueError):
    """A manifest (or scanned folder) that cannot be used; lists every problem at once."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = Path(source)
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s):\n  {lines}")
