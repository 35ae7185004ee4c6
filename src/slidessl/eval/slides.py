"""Slides read for evaluation through a torch ``DataLoader`` with worker processes.

:func:`read_slides` yields the slides of each batch of dataset indices in the order given
(a batch is a list: no padding, no reordering), read by ``workers`` processes while the
caller computes. A slide that cannot be read is carried back to this process as its
``(path, problem)`` and handed to the dataset's ``bad_slide`` here, so ``on_bad_slide``
behaves as without workers (``error``: its :class:`~slidessl.data.formats.SlideError`
raised; ``skip``: warned about and listed in the dataset's ``skipped``).

The dataset must be fork-safe (no open file between calls) and give ``load(index)`` (the
slide dict, or a raised ``SlideError``), ``slide_ids`` and ``bad_slide(slide_id, exc)``:
:class:`slidessl.data.dataset.SlideDataset` and the Prov-GigaPath reader
(:class:`slidessl.eval.gigapath_embed.GigapathSlides`) do. Whatever a slide's dict holds
depends on the slide only, never on the worker that read it.

Example::

    for items in read_slides(ds, [[0, 1], [2]], workers=2):
        vecs = embedder.embed(items)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from slidessl.data.formats import SlideError

__all__ = ["read_slides"]


class _Reading(Dataset):
    """``dataset.load`` with a read error returned as data (a ``SlideError`` does not
    survive the trip back from a worker process)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset.load(index)
        except SlideError as exc:
            sid = self.dataset.slide_ids[index]
            return {"slide_id": sid, "index": index, "error": (str(exc.path), exc.problem)}


def _as_list(batch: list) -> list:
    return batch


def _owned(item: dict) -> dict:
    """The item with its tensors copied out of shared memory: a caller may keep thousands
    (each shared tensor holds a file descriptor open)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def read_slides(dataset, batches: Iterable[list[int]], workers: int = 0) -> Iterator[list[dict]]:
    """For each list of indices in ``batches``: the slide dicts read, in that order, without
    the slides that could not be read (see the module docstring). The workers start here,
    not at the first ``next``: call it before opening a file they must not inherit (an
    HDF5 file's lock would outlive a killed parent in them)."""
    loader = DataLoader(
        _Reading(dataset), batch_sampler=list(batches), num_workers=workers, collate_fn=_as_list
    )
    return _checked(dataset, iter(loader), workers)


def _checked(dataset, loaded: Iterator[list[dict]], workers: int) -> Iterator[list[dict]]:
    for batch in loaded:
        items = []
        for item in batch:
            if "error" in item:
                dataset.bad_slide(item["slide_id"], SlideError(*item["error"]))
            else:
                items.append(_owned(item) if workers else item)
        yield items
