"""Diagnostic: how well does the demo's encoder learn a task WITH labels?

Trains the demo's `tiny` encoder (dense attention, optionally the grid-context conv) plus a
linear head end to end on one label of the demo cohort, on the demo's stored
patient-grouped folds (``runs/demo/folds.json``, written by ``make demo``), and prints the
held-out AUROC per fold. This is a supervised reference for what the pretrained encoder's
linear probe could reach with this architecture and this many slides; it uses labels, so
it is not a method, and nothing in the package depends on it.

    python benchmarks/diag_supervised_ceiling.py --task infiltrated --grid-context 0 3
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from slidessl.data.dataset import SlideDataset
from slidessl.eval.embed import pad_batch
from slidessl.models import build_encoder


def _batches(idx, size):
    for s in range(0, len(idx), size):
        yield idx[s : s + size]


def run_fold(items, y, train, test, grid_context, epochs, seed, batch=16):
    torch.manual_seed(seed)
    dim = items[0]["features"].shape[1]
    enc = build_encoder("tiny", in_dim=dim, attention="dense", grid_context=grid_context)
    head = torch.nn.Linear(enc.embed_dim, 1)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

    def scores(idx, train_mode):
        enc.train(train_mode)
        out = []
        for b in _batches(idx, batch):
            x, g, pm = pad_batch([items[i] for i in b])
            with torch.set_grad_enabled(train_mode):
                z = head(enc(x.float(), g, pm)).squeeze(-1)
            if train_mode:
                target = torch.as_tensor(y[b], dtype=torch.float32)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            out.append(z.detach())
        return torch.cat(out).numpy()

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        scores(rng.permutation(train), True)
    fit = roc_auc_score(y[train], scores(train, False))
    return fit, roc_auc_score(y[test], scores(test, False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="runs/demo", help="folder written by `make demo`")
    ap.add_argument("--task", default="infiltrated")
    ap.add_argument("--grid-context", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--max-tiles", type=int, default=512, help="as the demo's pretraining")
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    manifest = demo / "cohort" / "manifest.csv"
    folds = json.loads((demo / "folds.json").read_text())["tasks"][args.task]["folds"]
    labels = {r["slide_id"]: int(r[args.task]) for r in csv.DictReader(manifest.open())}
    items = list(SlideDataset(manifest, max_tiles=args.max_tiles))
    y = np.array([labels[it["slide_id"]] for it in items])
    fold = np.array([folds[it["slide_id"]] for it in items])
    print(f"{len(items)} slides, task {args.task}, {fold.max() + 1} patient-grouped folds")
    for gc in args.grid_context:
        train_auc, test_auc = [], []
        for f in range(fold.max() + 1):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            a, b = run_fold(items, y, tr, te, gc, args.epochs, seed=f)
            train_auc.append(a)
            test_auc.append(b)
        print(
            f"tiny encoder + linear head, supervised, grid_context={gc}: held-out AUROC "
            f"{np.mean(test_auc):.3f} +- {np.std(test_auc):.3f} (folds "
            f"{', '.join(f'{v:.2f}' for v in test_auc)}); training AUROC {np.mean(train_auc):.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
