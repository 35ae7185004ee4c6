"""The label-aware monitor: does pretraining help a labelled task, step by step?

DINO's k-NN evaluation (Caron et al., 2021, Sec. 4.1 and appendix: a weighted k-NN vote over
L2-normalised features, weights ``exp(cos / T)``, T = 0.07) applied to slide vectors:
every ``monitor.eval_every`` steps the *teacher* embeds a held-out labelled cohort
(``monitor.eval_manifest``, task ``monitor.eval_task``) exactly as ``slidessl embed``
would (every slide whole up to ``max_tiles``, Hilbert order, eval mode, the ``mean`` or
``cls`` readout), each slide is scored by the k nearest slides of *other patients*, and the
AUROC of those scores (binary; macro one-vs-rest for multi-class and multi-label) is logged
beside the same score at step 0 - the random initialisation, which the pretrained encoder
has to beat. The labels are read by this monitor only; nothing in training sees them.

Example::

    mon = LabelMonitor("heldout/manifest.csv", "infiltrated", k=10)
    init = mon.evaluate(arch.teacher["backbone"])      # step 0: the random init
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from slidessl.data.collate import pad_crops
from slidessl.data.dataset import SlideDataset
from slidessl.data.manifest import load_manifest
from slidessl.data.tasks import Task, build_tasks
from slidessl.models.encoder import READOUTS, readout

__all__ = ["LabelMonitor", "knn_auroc", "knn_scores"]

log = logging.getLogger(__name__)


def _targets(task: Task) -> np.ndarray:
    """(n, C) 0/1 targets: C = 1 for binary, one column per class / label otherwise."""
    if task.kind == "binary":
        return task.y.reshape(-1, 1).astype(np.float64)
    if task.kind == "multiclass":
        return np.eye(len(task.classes))[task.y]
    return task.y.astype(np.float64)


def knn_scores(X, targets, groups, k: int = 10, temperature: float = 0.07) -> np.ndarray:
    """``(n, C)`` weighted k-NN votes: for each slide, among the ``k`` most cosine-similar
    slides of *other* groups (patients), ``sum_j w_j t_j / sum_j w_j`` with
    ``w_j = exp(cos_j / temperature)``. ``targets`` (n, C) 0/1."""
    X = np.asarray(X, dtype=np.float64)
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = Z @ Z.T
    groups = np.asarray(groups)
    S[groups[:, None] == groups[None, :]] = -np.inf
    k = max(1, min(int(k), int(np.isfinite(S).sum(1).min())))
    nn = np.argsort(-S, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(S, nn, axis=1)
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    w = np.where(np.isfinite(sims), w, 0.0)
    votes = np.einsum("nk,nkc->nc", w, np.asarray(targets, dtype=np.float64)[nn])
    return votes / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)


def knn_auroc(X, task: Task, k: int = 10, temperature: float = 0.07) -> float:
    """AUROC of the leave-patient-out k-NN votes (macro over classes / labels that have both
    values among the slides); nan when no class has both."""
    from sklearn.metrics import roc_auc_score

    t = _targets(task)
    scores = knn_scores(X, t, task.patient_ids, k, temperature)
    aucs = [
        roc_auc_score(t[:, c], scores[:, c])
        for c in range(t.shape[1])
        if 0 < t[:, c].sum() < len(t)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


class LabelMonitor:
    """k-NN AUROC of the teacher's slide vectors on a held-out labelled cohort."""

    def __init__(
        self,
        manifest,
        task: str,
        *,
        k: int = 10,
        pooling: str = "mean",
        max_tiles: int | None = 8192,
        seed: int = 0,
        batch_size: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        if pooling not in READOUTS:
            raise ValueError(f"monitor.eval_pooling must be one of {READOUTS}, got {pooling!r}")
        manifest = load_manifest(manifest)
        tasks = build_tasks(manifest, [task])
        if len(tasks) != 1:
            raise ValueError(f"monitor.eval_task={task!r}: name one task, got {len(tasks)}")
        if tasks[0].kind == "survival":
            raise ValueError(
                f"monitor.eval_task={task!r}: the k-NN monitor scores class labels; name a "
                "binary, multi-class or multi-label task (survival: slidessl probe after "
                "training)"
            )
        self.task = tasks[0]
        if len(set(self.task.patient_ids)) < 2:
            raise ValueError(
                f"{manifest.source}: monitor.eval_task={task!r} needs slides of >= 2 patients"
            )
        ds = SlideDataset(manifest, max_tiles=max_tiles, order="hilbert", seed=seed)
        row = {sid: i for i, sid in enumerate(ds.slide_ids)}
        keep = [i for i, sid in enumerate(self.task.slide_ids) if sid in row]
        self.task = self.task.subset(np.array(keep, dtype=np.int64))
        self.items = [ds[row[sid]] for sid in self.task.slide_ids]
        self.k, self.pooling, self.batch_size = int(k), pooling, int(batch_size)
        self.device = torch.device(device)
        self.init: float | None = None
        self.history: list[tuple[int, float]] = []
        log.info(
            "label monitor: %d held-out slides of %d patients, task %r (%s), k-NN k=%d, readout %s",
            len(self.items),
            len(set(self.task.patient_ids)),
            self.task.name,
            self.task.kind,
            self.k,
            pooling,
        )

    @torch.no_grad()
    def embed(self, encoder) -> np.ndarray:
        """``(n, E)`` slide vectors of the held-out slides (task order), batched by length,
        in eval mode (the mode is restored)."""
        was_training = encoder.training
        encoder.eval()
        try:
            order = np.argsort([len(it["features"]) for it in self.items], kind="stable")
            out = [None] * len(self.items)
            for s in range(0, len(order), self.batch_size):
                idx = [int(i) for i in order[s : s + self.batch_size]]
                batch = pad_crops(
                    [
                        {"features": self.items[i]["features"], "coords": self.items[i]["grid"]}
                        for i in idx
                    ]  # fmt: skip
                )
                x, g, m = (
                    batch[key].to(self.device) for key in ("features", "coords", "padding_mask")
                )
                vecs = readout(encoder, x, g, m, self.pooling).cpu().numpy()
                for i, v in zip(idx, vecs):
                    out[i] = v
        finally:
            encoder.train(was_training)
        return np.stack(out)

    def evaluate(self, encoder, step: int = 0) -> float:
        """The k-NN AUROC of ``encoder`` now; the first call is the step-0 (init) value."""
        score = knn_auroc(self.embed(encoder), self.task, self.k)
        if self.init is None:
            self.init = score
        self.history.append((int(step), score))
        return score

    def state_dict(self) -> dict:
        return {"init": self.init, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.init = state.get("init")
        self.history = [tuple(h) for h in state.get("history", [])]
