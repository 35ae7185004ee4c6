"""Supervised baseline: gated-attention ABMIL trained per task and fold on tile features.

Same outer folds (from the folds file) and the same statistics as the linear probe. In each
outer fold, one patient-grouped stratified fifth of the training slides is held out for
early stopping (AdamW; the weights of the epoch with the lowest validation loss are kept).
On CPU it stays fast by sampling at most ``train_tiles`` tiles per slide per epoch and
batching slides with padding masks; validation and test use every loaded tile (or fixed
seeded subsamples of ``val_tiles`` / ``eval_tiles``). Survival tasks train one risk output
with the Cox partial likelihood over the slides of each batch (``eval.cox_loss``) and
stop early on the validation slides' partial likelihood.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slidessl.data.tasks import Task, inner_key
from slidessl.eval.cox_loss import cox_ph_loss
from slidessl.eval.folds import grouped_stratified_split
from slidessl.models.abmil import GatedABMIL
from slidessl.progress import progress as progress_bar

log = logging.getLogger(__name__)


@dataclass
class ABMILConfig:
    lr: float = 5e-4
    weight_decay: float = 1e-4
    epochs: int = 20
    patience: int = 4
    batch_size: int = 8
    train_tiles: int = 2048
    val_tiles: int | None = None  # tiles per slide for early stopping (None: all loaded)
    eval_tiles: int | None = None  # tiles per slide at test (None: all loaded)
    val_fraction_folds: int = 5  # inner split: 1 of this many patient-grouped folds
    proj_dim: int = 512
    attn_dim: int = 256
    dropout: float = 0.25
    seed: int = 0


def _targets(task: Task) -> tuple[torch.Tensor, int]:
    if task.kind == "survival":  # (n, 2) [time, event]; one risk output
        return torch.as_tensor(task.y, dtype=torch.float64), 1
    if task.kind == "binary":
        return torch.as_tensor(task.y, dtype=torch.float32)[:, None], 1
    if task.kind == "multiclass":
        return torch.as_tensor(task.y, dtype=torch.long), len(task.classes)
    return torch.as_tensor(task.y, dtype=torch.float32), task.y.shape[1]


def _loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "survival":
        return cox_ph_loss(logits[:, 0], target[:, 0], target[:, 1], reduction="sum")
    if kind == "multiclass":
        return F.cross_entropy(logits, target, reduction="sum")
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")


def _scores(kind: str, logits: torch.Tensor) -> np.ndarray:
    if kind == "multiclass":
        return torch.softmax(logits, dim=1).numpy()
    if kind == "survival":
        return logits[:, 0].numpy().astype(np.float64)
    p = torch.sigmoid(logits).numpy()
    return p[:, 0] if kind == "binary" else p


def _batch(feats: list[torch.Tensor], idx, max_tiles: int | None, gen: torch.Generator):
    chosen = []
    for i in idx:
        x = feats[i]
        if max_tiles is not None and len(x) > max_tiles:
            x = x[torch.randperm(len(x), generator=gen)[:max_tiles]]
        chosen.append(x)
    n = max(len(x) for x in chosen)
    out = torch.zeros(len(chosen), n, chosen[0].shape[1])
    mask = torch.ones(len(chosen), n, dtype=torch.bool)
    for b, x in enumerate(chosen):
        out[b, : len(x)] = x
        mask[b, : len(x)] = False
    return out, mask


@torch.no_grad()
def _predict(
    model, feats, idx, kind, batch_size, eval_tiles=None
) -> tuple[torch.Tensor, np.ndarray]:
    model.eval()
    logits = []
    for s in range(0, len(idx), batch_size):
        x, m = _batch(feats, idx[s : s + batch_size], eval_tiles, torch.Generator().manual_seed(0))
        logits.append(model(x, m))
    z = torch.cat(logits) if logits else torch.zeros(0, model.n_outputs)
    return z, _scores(kind, z)


def _fit(feats, task: Task, fit, val, cfg: ABMILConfig):
    """A GatedABMIL trained on slides ``fit``; with ``val`` (indices) the weights of the
    epoch with the lowest validation loss are kept (early stopping, ``cfg.patience``),
    without it every ``cfg.epochs`` epoch runs. Returns ``(model, history)``."""
    target, n_out = _targets(task)
    gen = torch.Generator().manual_seed(cfg.seed)  # tile subsets
    # weights and dropout from a stream of this training's own: reproducible on any thread
    model_gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = GatedABMIL(
        feats[0].shape[1], n_out, cfg.proj_dim, cfg.attn_dim, cfg.dropout, generator=model_gen
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, bad, history = float("inf"), None, 0, []
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(fit)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            x, m = _batch(feats, idx, cfg.train_tiles, gen)
            loss = _loss(task.kind, model(x, m), target[idx]) / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(fit)}
        history.append(row)
        if val is None:
            continue
        z, _ = _predict(model, feats, val, task.kind, cfg.batch_size, cfg.val_tiles)
        row["val_loss"] = val_loss = float(_loss(task.kind, z, target[val])) / max(len(val), 1)
        if val_loss < best - 1e-6:
            best, best_state, bad = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, best, history


def train_fold(
    feats: list[torch.Tensor], task: Task, train: np.ndarray, test: np.ndarray, cfg: ABMILConfig
) -> tuple[np.ndarray, dict]:
    """Train on ``train`` (indices; an inner split of it for early stopping), score ``test``."""
    groups = np.asarray(task.patient_ids)[train]
    key = inner_key(task, task.y[train])
    inner = grouped_stratified_split(key, groups, cfg.val_fraction_folds, cfg.seed)
    val, fit = train[inner == 0], train[inner != 0]
    model, best, history = _fit(feats, task, fit, val, cfg)
    _, scores = _predict(model, feats, test, task.kind, cfg.batch_size, cfg.eval_tiles)
    return scores, {"epochs": len(history), "best_val_loss": best, "history": history}


def fewshot_scorer(feats: list[torch.Tensor], task: Task, cfg: ABMILConfig):
    """ABMIL as the classifier of a few-shot draw (``eval.fewshot.fewshot_task(scorer=)``):
    trained on the draw's shots for ``cfg.epochs`` epochs (too few slides for a validation
    split: no early stopping), scoring the test slides; binary sub-problems of multi-label
    tasks train one output each."""

    def fit(train, y_train, test, multiclass: bool) -> np.ndarray:
        sub = task
        if task.kind == "multilabel":  # one label of it, as a binary problem
            y = np.zeros(len(task.slide_ids), dtype=np.int64)
            y[np.asarray(train)] = y_train
            sub = Task(task.name, "binary", task.columns, ["0", "1"], task.slide_ids,
                       task.patient_ids, y)  # fmt: skip
        model, _, _ = _fit(feats, sub, np.asarray(train), None, cfg)
        test = np.asarray(test)
        return _predict(model, feats, test, sub.kind, cfg.batch_size, cfg.eval_tiles)[1]

    return fit


def run_abmil(
    features: dict[str, torch.Tensor],
    tasks: list[Task],
    folds: list[np.ndarray],
    cfg: ABMILConfig,
    progress: bool = True,
    n_jobs: int = 1,
):
    """ABMIL for every task and fold; ``features`` maps slide id -> (n, D) tiles.

    With ``n_jobs > 1`` the (task, fold) trainings run on that many threads, each with one
    intra-op torch thread (robust on shared CPUs); each training draws its weights and
    dropout masks from a generator of its own, so results do not depend on ``n_jobs``.
    Returns ``(tasks, folds, scores, fold_logs)`` restricted to
    slides with features.
    """
    from concurrent.futures import ThreadPoolExecutor

    subs = []
    for task, fold in zip(tasks, folds):
        keep = np.array([s in features for s in task.slide_ids])
        if not keep.all():
            log.warning(
                "abmil: %d slides of task %r could not be read and are left out",
                int((~keep).sum()),
                task.name,
            )
        sub = task.subset(keep)
        sub.meta["n_missing_embeddings"] = int((~keep).sum())
        subs.append((sub, fold[keep], [features[s] for s in sub.slide_ids]))
    jobs = [(t, f) for t, (_, fold, _) in enumerate(subs) for f in range(int(fold.max()) + 1)]
    bar = progress_bar(total=len(jobs), desc="abmil", disable=not progress)

    def one(job):
        sub, fold, feats = subs[job[0]]
        test, train = np.where(fold == job[1])[0], np.where(fold != job[1])[0]
        res = train_fold(feats, sub, train, test, cfg) if len(test) else None
        bar.update(1)
        return res

    threads = torch.get_num_threads()
    if n_jobs > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            done = dict(zip(jobs, pool.map(one, jobs)))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    out_tasks, out_folds, out_scores, logs = [], [], [], []
    for t, (sub, fold, feats) in enumerate(subs):
        n_out = _targets(sub)[1]
        one = sub.kind in ("binary", "survival")
        scores = np.zeros((len(feats),) if one else (len(feats), n_out))
        task_logs = []
        for f in range(int(fold.max()) + 1):
            if done[(t, f)] is None:
                continue
            s, info = done[(t, f)]
            scores[fold == f] = s
            task_logs.append({"fold": f, **{k: v for k, v in info.items() if k != "history"}})
        sub.meta["abmil_folds"] = task_logs
        out_tasks.append(sub)
        out_folds.append(fold)
        out_scores.append(scores)
        logs.append(task_logs)
    return out_tasks, out_folds, out_scores, logs


def load_tile_features(
    manifest,
    max_tiles: int | None = 8192,
    seed: int = 0,
    on_bad_slide: str = "error",
    workers: int = 2,
) -> dict[str, torch.Tensor]:
    """Tile features of every readable slide (capped, seeded), keyed by slide id, read by
    ``workers`` DataLoader processes (at most the usable CPUs minus one)."""
    from slidessl.cpus import data_workers
    from slidessl.data.dataset import SlideDataset
    from slidessl.eval.slides import read_slides

    ds = SlideDataset(manifest, max_tiles=max_tiles, on_bad_slide=on_bad_slide, seed=seed)
    batches = [[i] for i in range(len(ds))]
    return {
        item["slide_id"]: item["features"]
        for items in read_slides(ds, batches, data_workers(workers))
        for item in items
    }
