"""``pretrain(cfg)``: the training loop behind ``slidessl pretrain``.

Builds the data pipeline, the student/teacher meta-architecture, AdamW with layer-wise
decay and the schedules; runs optimizer steps of ``train.accum_steps`` micro-batches each
(:mod:`slidessl.train.step`); logs metrics and collapse monitors; writes atomic checkpoints
and, at the end, exports the teacher backbone to ``OUT/teacher/`` and ``OUT/summary.json``.

``resume=True`` continues from the newest ``OUT/checkpoints/ckpt-*.pt``: model, optimizer,
centres, RNG states, epoch and position inside the epoch are restored, so on CPU the
resumed run reproduces the losses and final weights of an uninterrupted one. Under
``distributed.strategy=fsdp`` checkpoints are ``torch.distributed.checkpoint`` folders
``OUT/checkpoints/ckpt-*/`` (:mod:`slidessl.train.sharded_checkpoint`), resumable at any
number of processes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from slidessl.cpus import configure_threads
from slidessl.train import checkpoint as ckpt_io
from slidessl.train import sharded_checkpoint as dcp_io
from slidessl.train.config import dump_config
from slidessl.train.data import CropDataset, build_multicrop, build_slide_dataset, make_loader
from slidessl.train.distributed import (
    SlideShardSampler,
    init_distributed,
    wrap_model,
)
from slidessl.train.health import LossStall, WeightDrift
from slidessl.train.memory import check_memory
from slidessl.train.monitor import CollapseMonitor, MetricsWriter, MonitorWindow, NonFiniteGuard
from slidessl.train.optim import build_optimizer, param_groups
from slidessl.train.schedules import build_schedules
from slidessl.train.step import optimizer_step
from slidessl.train.summary import RunStats, export_teacher, write_summary

__all__ = ["pretrain"]

log = logging.getLogger(__name__)


def pretrain(cfg: dict, resume: bool = False) -> Path:
    """Train with ``cfg`` (from :func:`slidessl.train.config.load_config`); return the run folder.

    Also works under ``torchrun`` (one process per GPU, or gloo processes on CPU).
    """
    t = cfg["train"]
    ctx = init_distributed(
        t["device"], cfg["distributed"]["backend"], cfg["distributed"]["timeout_minutes"]
    )
    threads = torch.get_num_threads()  # sized for the run, given back after it
    try:
        return _pretrain(cfg, ctx, resume)
    finally:
        torch.set_num_threads(threads)
        ctx.close()


def _no_checkpoint(root: Path, fsdp: bool, ctx) -> str:
    """What --resume found in ``root`` instead of a checkpoint for this strategy."""
    msg = f"--resume: no checkpoint in {root}"
    this = f"this run: {ctx.world_size} process(es), strategy " + (
        "fsdp" if fsdp else "ddp" if ctx.distributed else "single process"
    )
    folders, whole = dcp_io.latest_checkpoint(root), ckpt_io.latest_checkpoint(root)
    shards = sorted(p.name for p in root.glob("rank*") if p.is_dir()) if root.is_dir() else []
    if folders is not None and not fsdp:
        return (
            f"{msg}: it holds FSDP checkpoints (the newest {folders.name}/, "
            "torch.distributed.checkpoint); resume them with distributed.strategy=fsdp, at "
            f"any number of processes ({this})"
        )
    if whole is not None and fsdp:
        return (
            f"{msg}: it holds {whole.name} of a single-process / DDP run; resume it with "
            f"distributed.strategy=ddp ({this})"
        )
    if shards:
        return (
            f"{msg}: it holds per-rank FSDP shards ({', '.join(shards)}) of a slidessl "
            "version before torch.distributed.checkpoint; this version resumes FSDP from "
            f"ckpt-*/ folders only: resume with that version, or start afresh ({this})"
        )
    tmp = dcp_io.incomplete_checkpoints(root)
    if tmp:
        return f"{msg}: only {tmp[-1].name}/, a save that a killed run did not finish"
    return msg


def _pretrain(cfg: dict, ctx, resume: bool) -> Path:
    t, device = cfg["train"], ctx.device
    configure_threads(share=ctx.local_world_size, what="pretrain")
    out = Path(cfg["out"])
    ckpt_dir = out / "checkpoints"
    fsdp = ctx.distributed and cfg["distributed"]["strategy"] == "fsdp"
    # FSDP runs checkpoint through torch.distributed.checkpoint (at any world size, 1 too)
    sharded = cfg["distributed"]["strategy"] == "fsdp"
    io = dcp_io if sharded else ckpt_io
    seed = cfg["seed"]
    ckpt_io.seed_everything(seed)

    slides = build_slide_dataset(cfg)
    crops = CropDataset(slides, build_multicrop(cfg["crops"]), seed, cfg["data"]["patient_pairs"])
    micro, accum = t["batch_size"], t["accum_steps"]
    global_batch = micro * accum * ctx.world_size
    sampler = SlideShardSampler(
        len(crops),
        global_batch,
        ctx.world_size,
        ctx.rank,
        seed,
        steps_per_epoch=t["steps_per_epoch"],
    )
    steps_per_epoch = sampler.steps_per_epoch
    epochs = t["epochs"]
    total_steps = epochs * steps_per_epoch
    stop_at = total_steps if t["max_steps"] is None else min(total_steps, t["max_steps"])
    schedules = build_schedules(cfg, steps_per_epoch, global_batch)

    arch = _build_arch(cfg, _feature_dim(slides)).to(device)
    arch.train()
    # before anything is written or stepped: a run that cannot fit says so, naming knobs
    tiles = getattr(slides, "num_tiles", None) or [cfg["data"]["max_tiles"]]
    memory = check_memory(cfg, arch, max(tiles), ctx.world_size)
    if ctx.is_main:  # config, data and memory checked: now the run folder
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    model = wrap_model(arch, ctx, cfg)
    # after wrapping: FSDP replaces the parameters with sharded ones
    optimizer = build_optimizer(param_groups(arch.student, cfg["optim"]["layer_decay"]), cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16/fp32 need no scaling
    m = cfg["monitor"]
    monitor = CollapseMonitor(m["usage_min_frac"], m["kl_center_min"], m["cls_std_min_frac"])
    window = MonitorWindow(m["window_slides"])
    guard = NonFiniteGuard(t["max_nan_steps"], t["grad_norm_warn"])
    stats = RunStats()
    # the initial weights (the random init every evaluation compares against): before resume
    drift = WeightDrift(list(arch.student["backbone"].parameters()))
    stall = LossStall(m["loss_stall_steps"], cfg["dino"]["out_dim"])
    # the label monitor embeds with the teacher: on every rank under FSDP (sharded weights)
    labels = _label_monitor(cfg, device) if ctx.is_main or fsdp else None
    health = {"loss_stall": stall, **({"label_monitor": labels} if labels else {})}
    # what a checkpoint holds besides the step, the data position and the config
    kept = dict(arch=arch, optimizer=optimizer, scaler=scaler, guard=guard, monitor=monitor,
                stats=stats, extra=health)  # fmt: skip
    step = 0
    if resume:
        latest = io.latest_checkpoint(ckpt_dir)
        if latest is None:
            raise FileNotFoundError(_no_checkpoint(ckpt_dir, sharded, ctx))
        state = io.restore_train_state(latest, device, **kept)
        step = int(state["step"])
        saved = state.get("sampler", {})
        if state.get("global_batch", global_batch) != global_batch:
            log.warning(
                "resuming with a global batch of %d slides, the checkpoint used %d: data "
                "order and schedules will not match the original run",
                global_batch,
                state.get("global_batch"),
            )
        log.info("resumed from %s at step %d (epoch %s)", latest, step, saved.get("epoch"))
    elif ctx.is_main and io.list_checkpoints(ckpt_dir):
        log.warning(
            "%s holds checkpoints of an earlier run; starting afresh (use --resume to "
            "continue it) and replacing them",
            ckpt_dir,
        )
        for old in io.list_checkpoints(ckpt_dir):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    writer = MetricsWriter(out, bool(t["tensorboard"]), resume=resume) if ctx.is_main else None
    if writer is not None and resume:
        writer.truncate_after(step)
    if ctx.is_main:
        log.info(
            "pretrain: %d slides, %d step(s)/epoch x %d epoch(s), global batch %d "
            "(%d x %d accum x %d proc), device %s",
            len(crops),
            steps_per_epoch,
            epochs,
            global_batch,
            micro,
            accum,
            ctx.world_size,
            device,
        )

    if labels is not None and labels.init is None:
        init = labels.evaluate(arch.teacher["backbone"], 0)
        log.info("label monitor at step 0 (the random init): k-NN AUROC %.4f", init)
    bar = _progress(t, ctx, stop_at, step)
    log_every, ckpt_every = max(t["log_every"], 1), t["checkpoint_every"]
    keep = t["keep_checkpoints"]
    try:
        while step < stop_at:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
            loader = make_loader(crops, sampler, cfg, epoch, ctx.rank, device)
            batches = iter(loader)
            while step < stop_at and step // steps_per_epoch == epoch:
                t0 = time.perf_counter()
                micro_batches = [b for b in (next(batches) for _ in range(accum)) if b is not None]
                t_data = time.perf_counter() - t0
                # slides whose features failed to read in a worker (on_bad_slide=skip)
                stats.skipped_reads += micro * accum - sum(b["batch_size"] for b in micro_batches)
                if not micro_batches:
                    raise RuntimeError(f"step {step}: every slide of the batch was skipped as bad")
                sched = schedules.at(step)
                logged = (step + 1) % log_every == 0 or step + 1 == stop_at
                res = optimizer_step(
                    model,
                    arch,
                    optimizer,
                    micro_batches,
                    sched,
                    device=device,
                    precision=t["precision"],
                    clip_grad=cfg["optim"]["clip_grad"],
                    drift=drift if logged else None,
                )
                if logged:
                    res["weight_dist"] = drift.distance()  # collective under FSDP
                step_time = time.perf_counter() - t0
                stats.add(res, t_data, step_time)
                if not res["finite"]:
                    guard.record(step, res)
                else:
                    guard.check_norm(step, res["grad_norm"])
                step += 1
                window.add(arch.take_monitor_rows())
                if labels is not None and logged:
                    every = max(cfg["monitor"]["eval_every"], 1)
                    res["knn_auroc_init"] = labels.init
                    if step % every == 0 or step == stop_at:
                        res["knn_auroc"] = labels.evaluate(arch.teacher["backbone"], step)
                if ctx.is_main and logged:
                    stall.check(step, res.get("dino_loss", float("nan")))
                    timing = (t_data, step_time)
                    row = _log_row(step, epoch, res, sched, timing, arch, monitor, window)
                    writer.write(row)
                    stats.last_monitors = dict(monitor.last)
                if bar is not None:  # the postfix must not force a redraw (log files)
                    bar.set_postfix(_postfix(res, sched, step_time, labels), refresh=False)
                    bar.update(1)
                if (ctx.is_main or sharded) and (
                    ckpt_every > 0 and step % ckpt_every == 0 or step == stop_at
                ):
                    epoch_now = step // steps_per_epoch
                    _save(ckpt_dir, sharded, keep, step=step, epoch=epoch_now, sampler=sampler,
                          cfg=cfg, **kept)  # fmt: skip
            del batches, loader
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    export_teacher(arch, out / "teacher", ctx.is_main)  # collective under FSDP
    if ctx.is_main:
        skipped = list(getattr(slides, "skipped", []))
        write_summary(
            out, stats, monitor, guard, skipped, step, stop_at, cfg, memory, health=health
        )
    return out


def _save(folder: Path, sharded: bool, keep: int, **parts) -> None:
    """One checkpoint: a ``torch.save`` file (rank 0), or a DCP folder (collective)."""
    step = parts["step"]
    if sharded:
        optimizer = parts.pop("optimizer")
        state = ckpt_io.capture_run_state(**parts)
        dcp_io.save_checkpoint(
            folder, step, keep, arch=parts["arch"], optimizer=optimizer, run_state=state
        )
    else:
        ckpt_io.save_checkpoint(ckpt_io.capture_train_state(**parts), folder, step, keep)


def _feature_dim(slides) -> int:
    dim = getattr(slides, "feature_dim", None)
    if dim is None:
        dim = int(slides[0]["features"].shape[1])
    return int(dim)


def _build_arch(cfg: dict, feature_dim: int):
    """The meta-architecture, its weights drawn right after seeding torch with ``cfg.seed``:
    the student's initial backbone is exactly ``slidessl embed random:OUT/teacher --seed
    SEED`` (the random init every evaluation compares the pretrained teacher with)."""
    from slidessl.ssl.meta import SSLMetaArch

    torch.manual_seed(int(cfg["seed"]))
    return SSLMetaArch.from_config(cfg, feature_dim)


def _label_monitor(cfg: dict, device):
    """The label-aware k-NN monitor of ``monitor.eval_manifest`` (None when unset)."""
    m = cfg["monitor"]
    if not m["eval_manifest"]:
        return None
    if not m["eval_task"]:
        raise ValueError(
            "monitor.eval_manifest is set but monitor.eval_task is not: name a label column"
        )
    from slidessl.train.label_monitor import LabelMonitor

    cap = m["eval_max_tiles"] if m["eval_max_tiles"] is not None else cfg["data"]["max_tiles"]
    return LabelMonitor(
        m["eval_manifest"],
        m["eval_task"],
        k=m["eval_k"],
        pooling=m["eval_pooling"],
        max_tiles=cap,
        seed=cfg["seed"],
        device=device,
    )


def _postfix(res: dict, sched: dict, step_time: float, labels) -> dict:
    """The progress bar's health line: loss, grad norm, update ratio, the label monitor."""
    out = {
        "loss": f"{res.get('loss', float('nan')):.4f}",
        "gnorm": f"{res.get('grad_norm', float('nan')):.3g}",
        "lr": f"{sched['lr']:.2e}",
    }
    if "update_ratio" in res:
        out["upd"] = f"{res['update_ratio']:.2e}"
    if labels is not None and labels.history:
        out["knn"] = f"{labels.history[-1][1]:.3f}/{labels.init:.3f}"
    out["slides_s"] = f"{res['slides'] / max(step_time, 1e-9):.2f}"
    return out


def _progress(t: dict, ctx, total: int, initial: int):
    if not (t["progress"] and ctx.is_main):
        return None
    from slidessl.progress import progress

    return progress(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)


def _log_row(step, epoch, res, sched, timing, arch, monitor, window) -> dict:
    t_data, step_time = timing
    row = {"step": step, "epoch": epoch}
    row.update({k: res[k] for k in sorted(res) if k.endswith("loss") or k == "loss"})
    row.update(
        {
            "lr": sched["lr"],
            "wd": sched["wd"],
            "momentum": sched["momentum"],
            "teacher_temp": sched["teacher_temp"],
            "grad_norm": res["grad_norm"],
            "update_ratio": res.get("update_ratio", float("nan")),
            "weight_dist": res.get("weight_dist", float("nan")),
            "slides_per_s": res["slides"] / max(step_time, 1e-9),
            "data_wait_frac": t_data / max(step_time, 1e-9),
            "finite": res["finite"],
        }
    )
    center = None if arch.sinkhorn else arch.dino_loss.center.detach().float().cpu()
    stats = window.stats(center, sched["teacher_temp"])
    if stats:
        monitor.check(stats, step)
        row.update(stats)
    if "knn_auroc_init" in res:  # label monitor columns: blank on steps it did not run
        row["knn_auroc"] = res.get("knn_auroc", "")
        row["knn_auroc_init"] = res["knn_auroc_init"]
    return row
