"""Training data: slide dataset -> multi-crop views -> collated batches in DataLoader workers.

Crop randomness is drawn from a generator seeded by ``(seed, epoch, slide index)``, so the
views of a slide do not depend on which worker, rank or micro-batch loads it. That makes
gradient accumulation, multi-process training and ``--resume`` reproduce the same batches
as one uninterrupted single-process run. Each worker additionally seeds python / numpy /
torch from ``(seed, epoch, rank, worker id)``. Slide files are opened lazily inside each
worker by :class:`slidessl.data.dataset.SlideDataset` (h5 handles never cross a fork).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidessl.cpus import data_workers
from slidessl.data.collate import collate_views
from slidessl.train.checkpoint import worker_seed

__all__ = ["CropDataset", "build_multicrop", "build_slide_dataset", "make_loader"]


def build_multicrop(crops_cfg: dict):
    """``views.MultiCrop`` from the config's ``crops:`` section; unknown keys name themselves."""
    from slidessl.data import views

    try:
        return views.MultiCrop(views.MultiCropConfig.from_dict(crops_cfg))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config section crops: {exc}") from exc


def build_slide_dataset(cfg: dict):
    """The manifest's slides as a ``SlideDataset`` (spatial order, capped, on_bad_slide)."""
    from slidessl.data.dataset import SlideDataset
    from slidessl.data.manifest import load_manifest

    d = cfg["data"]
    if not d["manifest"]:
        raise ValueError("data.manifest is not set: pass data.manifest=PATH (CSV or folder)")
    if not Path(d["manifest"]).exists():
        raise FileNotFoundError(
            f"data.manifest={d['manifest']}: no such file or folder (set data.manifest=PATH, "
            "a CSV or a folder of slides; docs/data.md)"
        )
    manifest = load_manifest(d["manifest"])
    if len(manifest.entries) == 0:
        raise ValueError(f"{d['manifest']}: the manifest lists no slides")
    return SlideDataset(
        manifest,
        max_tiles=int(d["max_tiles"]),
        order=d["order"],
        on_bad_slide=d["on_bad_slide"],
        seed=int(cfg["seed"]),
    )


class CropDataset(Dataset):
    """``ds[i]`` -> multi-crop views of slide ``i`` (or ``None`` for a skipped bad slide).

    ``patient_pairs`` = p > 0: with probability p, a slide whose patient has other slides
    takes its second and later global crops and the second half of its local crops from
    one of them (drawn at random): positive pairs across slides of one patient, who share
    the patient's labels but not the slide's incidental make-up (no label is read; the
    manifest's ``patient_id`` is)."""

    def __init__(self, slides, multicrop, seed: int, patient_pairs: float = 0.0) -> None:
        self.slides, self.multicrop, self.seed = slides, multicrop, int(seed)
        self.epoch = 0
        self.patient_pairs = float(patient_pairs)
        if not 0.0 <= self.patient_pairs <= 1.0:
            raise ValueError(f"data.patient_pairs must lie in [0, 1], got {patient_pairs}")
        groups: dict[str, list[int]] = {}
        for i, entry in enumerate(getattr(slides, "entries", [])):
            groups.setdefault(entry.patient_id, []).append(i)
        self.siblings = {i: [j for j in g if j != i] for g in groups.values() for i in g}

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s crops and (for capped slides) ``epoch``'s tile subsample."""
        self.epoch = int(epoch)
        if hasattr(self.slides, "set_epoch"):
            self.slides.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int):
        slide = self.slides[index]
        if slide is None:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        views = self.multicrop(slide, rng)
        others = self.siblings.get(int(index))
        if self.patient_pairs > 0 and others and rng.random() < self.patient_pairs:
            other = self.slides[others[int(rng.integers(len(others)))]]
            if other is not None:
                second = self.multicrop(other, rng)
                views["global"][1:] = second["global"][1:]
                half = len(views["local"]) // 2
                views["local"][half:] = second["local"][half:]
                views["paired_with"] = other["slide_id"]
        return views


class _WorkerInit:
    def __init__(self, seed: int, epoch: int, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        s = worker_seed(self.seed, self.epoch, worker_id, self.rank)
        random.seed(s)
        np.random.seed(s)  # noqa: NPY002 - legacy global state, seeded too
        torch.manual_seed(s)


def make_loader(
    crops: CropDataset, sampler, cfg: dict, epoch: int, rank: int, device: torch.device
) -> DataLoader:
    """A DataLoader for one epoch: worker processes, prefetching, pinned memory on GPU."""
    d = cfg["data"]
    share = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes of the run on this machine
    workers = data_workers(int(d["num_workers"]), share=share)
    pin = d["pin_memory"]
    pin = device.type == "cuda" if pin == "auto" else bool(pin)
    crops.set_epoch(epoch)
    kwargs = {}
    if workers > 0:
        kwargs = {
            "prefetch_factor": int(d["prefetch_factor"]),
            "worker_init_fn": _WorkerInit(int(cfg["seed"]), epoch, rank),
            "persistent_workers": False,
        }
    # An explicit generator: creating the loader iterator must not draw from the global torch
    # RNG (it would shift drop-path randomness between a resumed and an uninterrupted run).
    generator = torch.Generator().manual_seed(worker_seed(int(cfg["seed"]), epoch, -1, rank))
    return DataLoader(
        crops,
        generator=generator,
        batch_size=int(cfg["train"]["batch_size"]),
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_views,
        pin_memory=pin,
        drop_last=False,
        **kwargs,
    )


def to_device(batch, device: torch.device, non_blocking: bool = True):
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device, non_blocking) for v in batch]
    return batch
