"""The one training loop: `refbench train MODEL`, from one CPU process to multi-node GPUs.

Read top to bottom, a run is:

    setup_distributed()            refbench.distributed: torchrun env -> rank/world/device
    load the dataset manifest      refbench.data.load_manifest (errors name the prepare command)
    fresh or resume?               rank 0 decides and reads last.pt, every rank gets it (or the error)
    build the model                models.build(name, variant, **overrides), each node's first rank
                                   first (weights download); then each rank its own RNG stream;
                                   SyncBatchNorm on CUDA with several ranks
    resume                         model, optimiser, scaler, this rank's RNG, (epoch, step_in_epoch)
    for each epoch:
        stream train batches       refbench.data.TrainLoader.epoch(epoch, skip=step_in_epoch * accum):
                                   one DataLoader for the run, its workers live across epochs
        step                       lr = get_lr(step) (pure), autocast, grad accumulation, clip
        every ckpt_every steps     last.pt (atomic)
        validate                   refbench.eval.evaluate.score_split on val, every sentence, the same
                                   metric code as `refbench eval` (float32); best.pt chosen on val mIoU only
                                   (gIoU on gRefCOCO);
                                   one val loader for the run, its workers live across validations
        log                        rich progress, log.jsonl (loss terms and, for models with
                                   queries, refbench.eval.diversity's figures), curves.png

Batch size semantics: `batch_size` is the GLOBAL batch per optimiser step. Each rank takes
batch_size / (world_size * grad_accum) samples per micro-batch, so changing the number of GPUs
(or adding accumulation) keeps the optimisation identical in expectation. An epoch is
ceil(train refs / global batch) optimiser steps on every rank (the train stream is resampled, so
all ranks run the same number of steps).

Resume: checkpoints hold the training position (epoch, step_in_epoch), the RNG states and the
optimiser. The train stream of an epoch is a pure function of (seed, epoch, rank, worker), so
`--resume` replays the epoch's stream and skips the batches already used (their JPEGs are
decoded again, which costs at most one epoch of data loading, never model compute). On CPU a
resumed run ends with bitwise the same weights as an uninterrupted one (tests/train/test_train.py).

Ranks never decide alone: an error one rank would raise (a run already there, an unresumable
checkpoint, weights that do not load, a non-finite loss) is decided on rank 0 or shared with a
collective, and every rank raises it, so none is left waiting in a collective until the NCCL
timeout. Losses stay on the device between logs (no host sync per micro-batch); non-finite
ones are checked at each log, checkpoint and validation, so no checkpoint holds diverged weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from refbench import __version__, checkpoint, remote
from refbench.models.api import loss_terms
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.distributed import Dist, all_gather_object, autocast_dtype, barrier, setup_distributed
from refbench.errors import RefbenchError
from refbench.eval import diversity, evaluate
from refbench.eval.metrics import get_protocol
from refbench.eval.plots import plot_curves
from refbench.fsutil import atomic_write_json, atomic_write_text
from refbench.progress import TrainProgress
from refbench.train.config import TrainConfig, model_overrides, run_steps
from refbench.train.recipes import Recipe, recipe_lr

# ------------------------------------------------------------------------------ the loop


def train(cfg: TrainConfig) -> Path:
    """Train `cfg.model` on `cfg.dataset`; returns the run folder holding last.pt and best.pt."""
    d = setup_distributed()
    rec = cfg.recipe
    dataset_dir = remote.join(cfg.shards, cfg.dataset)
    manifest = data.load_manifest(dataset_dir)
    if manifest["splits"].get("train", {}).get("refs", 0) == 0:
        raise RefbenchError(f"{remote.join(dataset_dir, 'manifest.json')}: the dataset has no train split")

    micro = _micro_batch(rec, d.world)
    steps_per_epoch = data.steps_per_epoch(manifest, "train", rec.batch_size)
    total_steps = run_steps(cfg, manifest)

    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one fixed input size: let cuDNN pick its fastest kernels once

    # --- rank 0 decides how the run starts (fresh, or from last.pt, which only rank 0 reads), and
    # every rank gets the same answer: one error on every rank, never one rank raising alone
    last_path, best_path = cfg.out / "last.pt", cfg.out / "best.pt"
    ckpt = _start_checkpoint(cfg, d, last_path)

    # --- model and optimiser (the same init on every rank: seed before building)
    net = _build_model(cfg, d)
    _seed_rank(cfg.seed, d)  # dropout and the like: each rank its own stream from here on
    net.to(d.device)
    if use_channels_last(d.device):
        net = net.to(memory_format=torch.channels_last)
    net = sync_batchnorm(net, d, rec)
    optimizer = _optimizer(net, rec)
    amp_dtype = autocast_dtype(rec.amp, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)

    step, epoch, step_in_epoch = 0, 0, 0
    select, select_name = evaluate.selection_metric(cfg.dataset, rec.protocol)  # val mIoU, or gIoU on gRefCOCO
    best = {"metric": select_name, "value": None, "step": None}
    notes: list[str] = []  # said once at the start, and logged
    if ckpt is not None:
        if ckpt["step"] >= total_steps:
            if d.main:
                print(f"{cfg.out}: the run has already finished ({ckpt['step']} of {total_steps} steps); nothing to resume")
            return cfg.out
        net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        notes += filter(None, [_load_scaler(scaler, ckpt.get("scaler"), rec.amp)])
        step, epoch, step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        note = checkpoint.restore_rank_rng(ckpt["rng"], d)
        if note:
            notes.append(note)
            _seed_rank(cfg.seed, d, step)
        if ckpt["best"].get("metric") == select_name:
            best = ckpt["best"]
        else:  # written before gRefCOCO runs picked best.pt on gIoU: the next validation starts the choice afresh
            notes.append(f"best.pt was chosen on {ckpt['best'].get('metric')}; from here on it is chosen on {select_name}")
        del ckpt

    ddp = net
    if d.world > 1:
        ddp = DistributedDataParallel(net, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    context = {
        "cfg": cfg, "dist": d, "manifest": manifest, "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
    }
    if d.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        _write_run_config(cfg, manifest, context)
        _trim_log(cfg.out / "log.jsonl", step)

    def save_last(metrics: dict | None = None) -> None:
        health.check(step)  # never a checkpoint of non-finite weights; every rank raises together
        rng = checkpoint.rank_rng_states(d)  # a collective: every rank's own states, to rank 0
        if d.main:
            checkpoint.save(last_path, _payload(net, optimizer, scaler, cfg, manifest, step, epoch, step_in_epoch,
                                                best, metrics, rng))

    progress = TrainProgress(total_steps=total_steps, start_step=step, enabled=d.main and not cfg.quiet,
                             title=f"train {cfg.model}/{cfg.variant} on {cfg.dataset}")
    log = _JsonlLog(cfg.out / "log.jsonl", enabled=d.main)
    for note in notes:
        progress.note(f"note: {note}")
        log.write({"step": step, "note": note})
    health = _LossHealth(d)
    shown_loss = float("nan")  # the loss on the progress bar, read from the device at log time only
    shown_rate = 0.0  # samples/s on the progress bar: the latest window that had samples
    ran_here = 0
    rank_pieces: list = []  # this rank's train images in the last epoch: (shard, start, stop), disjoint across ranks
    # one train stream for the run, one val loader: their worker processes live across epochs and validations
    trains = train_stream.TrainLoader(
        dataset_dir, manifest, split="train", image_size=net.image_size, batch_size=micro, seed=cfg.seed,
        num_batches=steps_per_epoch * rec.grad_accum, workers=rec.workers, rank=d.rank, world=d.world,
        pin_memory=d.device.type == "cuda", preprocess=get_protocol(rec.protocol).preprocess,
    )
    val_loader = None  # made at the first validation
    with progress, contextlib.ExitStack() as loaders:
        loaders.callback(trains.close)
        loaders.callback(lambda: val_loader is not None and val_loader.close())
        while step < total_steps:
            batches = trains.epoch(epoch, skip_batches=step_in_epoch * rec.grad_accum)
            rank_pieces = batches.pieces
            it = iter(batches)
            window = _Window()
            while step_in_epoch < steps_per_epoch and step < total_steps:
                lr = recipe_lr(rec, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                net.train()
                log_now = (step + 1) % rec.log_every == 0 or step + 1 == total_steps
                terms = _optimizer_step(ddp, net, optimizer, scaler, it, rec, d, amp_dtype, window, figures=log_now)
                step += 1
                step_in_epoch += 1
                ran_here += 1
                health.add(terms["loss"], step)
                shown_rate = window.samples_per_s(d.world)  # read before a log resets the window: never its empty 0.0
                if log_now:
                    health.check(step)
                    terms = {k: float(v) for k, v in terms.items()}  # the one host sync of a logging window
                    shown_loss = terms["loss"]
                    log.write({"step": step, "epoch": epoch, "lr": lr, **terms,
                               "samples_per_s": shown_rate, "data_wait": window.data_wait_share()})
                    window.reset()
                if ran_here == 1 and math.isnan(shown_loss):
                    shown_loss = float(terms["loss"])  # one sync, so the bar never starts at "nan"
                progress.update(step, epoch=epoch, loss=shown_loss, lr=lr, samples_per_s=shown_rate)
                end_of_epoch = step_in_epoch == steps_per_epoch or step == total_steps
                validate_now = (rec.val_every and step % rec.val_every == 0) or (rec.val_every is None and end_of_epoch)
                if validate_now:
                    health.check(step)
                    if val_loader is None:
                        val_loader = evaluate.split_loader(net, dataset_dir, manifest, "val", d, batch_size=micro * 2, workers=rec.workers,
                                                           protocol=evaluate.validation_protocol(cfg.dataset, rec.protocol),
                                                           persistent=True)
                    metrics = evaluate.validate(net, dataset_dir, manifest, d, batch_size=micro * 2,
                                                workers=rec.workers, max_batches=rec.val_max_batches,
                                                protocol=rec.protocol, loader=val_loader)
                    log.write({"step": step, "epoch": epoch, "val": metrics, "val_precision": evaluate.EVAL_PRECISION})
                    window.reset()  # throughput counts training only
                    progress.note(f"step {step}: {evaluate.validation_line(metrics)} ({cfg.dataset} val, "
                                  f"{evaluate.validation_protocol(cfg.dataset, rec.protocol)} protocol, n={metrics['n']})")
                    if best["value"] is None or metrics[select] > best["value"]:
                        best = {**best, "value": metrics[select], "step": step}
                        if d.main:
                            checkpoint.save(best_path, _payload(net, None, None, cfg, manifest, step, epoch,
                                                                step_in_epoch, best, metrics, None))
                    if end_of_epoch:
                        epoch, step_in_epoch = epoch + 1, 0
                    save_last(metrics)
                    if d.main:
                        plot_curves(cfg.out / "log.jsonl", cfg.out / "curves.png", title=f"{cfg.model}/{cfg.variant} on {cfg.dataset}")
                elif end_of_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                    save_last()
                elif step % rec.ckpt_every == 0:
                    save_last()
                if cfg.stop_after is not None and ran_here >= cfg.stop_after:
                    save_last()
                    barrier(d)
                    return cfg.out
                if step_in_epoch == 0:
                    break  # the epoch ended: the next one streams from the same workers, restarted on it
            del it, batches
    _check_ranks_agree(net, d, log, rank_pieces)
    barrier(d)
    return cfg.out


def _decided_on_rank0(d: Dist, decide) -> Any:
    """Run `decide()` on rank 0 only; every rank returns its result, or raises its RefbenchError."""
    outcome: list = [None, None]  # [result, (message, hint) of an error]
    if d.main:
        try:
            outcome[0] = decide()
        except RefbenchError as e:
            outcome[1] = (e.message, e.hint)
    if d.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise RefbenchError(*outcome[1])
    return outcome[0]


def _start_checkpoint(cfg: TrainConfig, d: Dist, last_path: Path) -> dict | None:
    """The checkpoint to resume from (rank 0 reads it and sends it to every rank; `--out` need
    only be on rank 0's disk), or None for a fresh run. Errors are raised on every rank."""
    from refbench import checkpoint

    loaded: list = [None]

    def decide() -> bool:
        if cfg.resume:
            loaded[0] = checkpoint.load(last_path)
            _check_resumable(loaded[0], cfg, last_path)
            return True
        if last_path.exists():
            raise RefbenchError(f"{cfg.out}: a run already exists here", hint="add --resume to continue it, or choose another --out")
        return False

    if not _decided_on_rank0(d, decide):
        return None
    return checkpoint.broadcast_from_rank0(loaded[0], d)


def _build_model(cfg: TrainConfig, d: Dist):
    """The model, the same init on every rank. The first rank of each node builds first (it may
    download the CLIP weights into the node's cache), the node's other ranks after it (from the
    cache); a failure on any rank is raised on every rank."""
    import torch

    from refbench import models

    overrides = model_overrides(cfg)
    net, error = None, None
    for turn in ((d.local_rank == 0), (d.local_rank != 0)):
        if turn:
            torch.manual_seed(cfg.seed)
            try:
                net = models.build(cfg.model, cfg.variant, **overrides)
            except (models.ModelError, RefbenchError) as e:
                error = str(e) if isinstance(e, models.ModelError) else e.message
        errors = [error]
        if d.world > 1:
            import torch.distributed as dist

            errors = [None] * d.world
            dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e), None)
        if failed:
            raise RefbenchError(failed)
    return net


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s own RNG stream (dropout, ...) from step `step` on: distinct per
    rank (identical dropout masks on every rank would correlate the ranks' gradients)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(("train", seed, rank, step)).encode()).digest()[:8], "little") >> 1


def _seed_rank(seed: int, d: Dist, step: int = 0) -> None:
    import random

    import torch

    value = rank_seed(seed, d.rank, step)
    torch.manual_seed(value)  # the CPU generator and every CUDA device's
    random.seed(value)


def sync_batchnorm(net, d: Dist, rec: Recipe):
    """BatchNorm across ranks: on CUDA with more than one rank, every BatchNorm (CLIP ResNet's,
    and any head's) becomes a SyncBatchNorm when the recipe says `sync_bn` (as CRIS), so its
    statistics come from the global batch (64 images) rather than each GPU's few, and every rank
    holds the same running statistics. Gloo on CPU has no SyncBatchNorm; one process needs none."""
    import torch

    if rec.sync_bn and d.world > 1 and d.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def _load_scaler(scaler, state: dict | None, amp: str) -> str | None:
    """Load a GradScaler state, unless the run it came from scaled nothing (bf16 or full
    precision save an empty state, which an fp16 scaler refuses); returns a note then."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        return f"--amp {amp}: the checkpoint was trained without fp16 loss scaling; the scaler starts afresh"
    return None


class _LossHealth:
    """Non-finite losses, tracked on the device without a host sync per step, and checked (one
    all-reduce, then every rank raises the same error) at log time, before every checkpoint and
    before validation: a diverged run stops on every rank together and never saves its weights."""

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.first_bad = None  # 0-dim int64 tensor: the first step with a non-finite loss, or -1

    def add(self, loss, step: int) -> None:
        import torch

        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, step: int) -> None:
        import torch

        if self.first_bad is None:
            return
        flag = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, 1 << 62), self.first_bad)
        if self.d.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # the earliest bad step on any rank
        first = int(flag)
        if first != 1 << 62:
            raise RefbenchError(f"the training loss became non-finite (nan or inf) at step {first}",
                                hint="lower --lr or use --amp off; last.pt holds the last finite state")


def _micro_batch(rec: Recipe, world: int) -> int:
    per_step = world * rec.grad_accum
    if rec.batch_size % per_step:
        raise RefbenchError(
            f"global batch {rec.batch_size} does not split over {world} rank(s) x {rec.grad_accum} accumulation step(s)",
            hint="choose --batch-size divisible by world_size * grad_accum",
        )
    return rec.batch_size // per_step


def _optimizer(net, rec: Recipe):
    """Adam(W) with the CLIP encoders' parameters at lr * backbone_lr_scale (but those named in
    backbone_lr_exempt, e.g. CRIS's positional embeddings, at the base lr)."""
    backbone, head = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        exempt = any(part in name for part in rec.backbone_lr_exempt)
        (backbone if name.startswith("backbone.") and not exempt else head).append(p)
    groups = [{"params": head, "lr_scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_scale": rec.backbone_lr_scale})
    for g in groups:
        g["lr"] = rec.lr * g["lr_scale"]
    # fused: one kernel over all parameters (on CPU ~20x faster than the per-tensor loop, which
    # matters: the CLIP token embedding alone is 6.3M parameters even in the tiny variants)
    if rec.weight_decay:
        return torch.optim.AdamW(groups, lr=rec.lr, weight_decay=rec.weight_decay, fused=True)
    return torch.optim.Adam(groups, lr=rec.lr, fused=True)


def _optimizer_step(ddp, net, optimizer, scaler, it, rec: Recipe, d: Dist, amp_dtype, window,
                    figures: bool = True) -> dict:
    """One optimiser step over `grad_accum` micro-batches; returns the mean loss terms as 0-dim
    tensors on the device (read them at log time: a float() here would wait for the GPU), with
    the query-diversity figures (`refbench.eval.diversity`) when `figures` (the loop asks for them
    on the steps it logs, the only ones that read them).

    Each phase is a named profiler range (`refbench.step.*`; free when no profiler runs), which
    `refbench bench step` reads to say where a step goes."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict = {}  # name -> 0-dim tensor on the device: no host sync per micro-batch
    for k in range(rec.grad_accum):
        t0 = time.perf_counter()
        with _phase("data_wait"):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError("the train stream ended early: the loader yielded fewer batches than an epoch needs") from None
        t1 = time.perf_counter()
        with _phase("to_device"):
            on_device = data.to_device(batch, d.device, channels_last=use_channels_last(d.device))
        image, tokens, mask = on_device["image"], on_device["tokens"], on_device["mask"]
        last = k == rec.grad_accum - 1
        sync = contextlib.nullcontext() if last or ddp is net else ddp.no_sync()
        with sync:
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                with _phase("forward"):
                    out = ddp(image, tokens)
                with _phase("loss"):
                    terms = loss_terms(net, out, mask, on_device.get("no_target"))  # the flag, where the loss takes it
            with _phase("backward"):
                scaler.scale(terms["loss"] / rec.grad_accum).backward()
        if figures:
            with _phase("diversity"):
                terms = {**terms, **diversity.batch_means(out)}  # query diversity, for models with queries
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / rec.grad_accum
        window.add(samples=image.shape[0], wait=t1 - t0, total=time.perf_counter() - t0)
    if rec.grad_clip:
        with _phase("clip"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), rec.grad_clip)
    with _phase("optimizer"):
        scaler.step(optimizer)
        scaler.update()
    return totals


# device type -> train in channels_last (NHWC) memory format. On CPU too: oneDNN's convolutions
# and BatchNorm skip their NCHW reorders (tiny models' training step 0.70-0.83x the NCHW time,
# `refbench bench step`); the same function up to float rounding.
CHANNELS_LAST = {"cuda": True, "cpu": True}


def use_channels_last(device) -> bool:
    """Whether the model and its input images are laid out channels_last on `device`."""
    return CHANNELS_LAST.get(torch.device(device).type, False)


def _phase(name: str):
    """A profiler range `refbench.step.NAME` (torch.profiler shows it; without a profiler it costs microseconds)."""
    return torch.profiler.record_function(f"refbench.step.{name}")


class _Window:
    """Throughput and data-wait accounting over a logging window, in wall time since the window
    opened: on a GPU the steps' kernels run after their Python returns, and the log's one host
    sync (reading the losses) closes the window, so wall time counts the GPU's work too."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples, self.wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, samples: int, wait: float, total: float) -> None:
        self.samples += samples
        self.wait += wait

    def _elapsed(self) -> float:
        return time.perf_counter() - self.start

    def samples_per_s(self, world: int) -> float:
        elapsed = self._elapsed()
        return world * self.samples / elapsed if elapsed > 0 and self.samples else 0.0

    def data_wait_share(self) -> float:
        elapsed = self._elapsed()
        return min(1.0, self.wait / elapsed) if elapsed > 0 else 0.0


def _payload(net, optimizer, scaler, cfg: TrainConfig, manifest: dict, step: int, epoch: int,
             step_in_epoch: int, best: dict, metrics: dict | None, rng: dict | None) -> dict:
    return checkpoint.make_payload(
        net, dataset_dir=remote.join(cfg.shards, cfg.dataset), manifest=manifest, dataset=cfg.dataset, step=step, epoch=epoch,
        step_in_epoch=step_in_epoch, optimizer=optimizer, scaler=scaler, recipe=dataclasses.asdict(cfg.recipe),
        train={"dataset": cfg.dataset, "seed": cfg.seed, "overrides": cfg.model_overrides, "run": cfg.out.name},
        best=best, metrics=metrics,
        rng=rng,  # every rank's own RNG states (checkpoint.rank_rng_states); None in weights-only files
    )


_RESUME_FREE = ("workers",)  # recipe fields a resumed run may change (they do not change what it computes)


def _check_resumable(ckpt: dict, cfg: TrainConfig, path: Path, net=None) -> None:
    """Refuse to resume a checkpoint of another model, variant, dataset, model config or recipe
    (one line naming the fields that differ)."""
    want = (cfg.model, cfg.variant, cfg.dataset)
    have = (ckpt["model"]["name"], ckpt["model"]["variant"], ckpt.get("dataset", {}).get("name"))
    if want != have:
        raise RefbenchError(
            f"{path}: checkpoint is for {have[0]}/{have[1]} on {have[2]}, not {want[0]}/{want[1]} on {want[2]}",
            hint="resume with the same MODEL, --variant and --dataset, or choose another --out",
        )
    if ckpt.get("optimizer") is None:
        raise RefbenchError(f"{path}: checkpoint holds weights only (no optimiser state); it cannot be resumed")
    plain = lambda obj: json.loads(json.dumps(obj, default=str))  # noqa: E731 (tuples -> lists, paths -> str)
    differ = []
    from refbench import models

    want = net.config if net is not None else models.make_config(cfg.model, cfg.variant, **model_overrides(cfg))
    have_cfg, want_cfg = plain(ckpt["model"].get("config", {})), plain(dataclasses.asdict(want))
    differ += [f"model config {k}: {have_cfg.get(k)!r} -> {want_cfg.get(k)!r}"  # None: decided when built
               for k in sorted(set(have_cfg) | set(want_cfg)) if want_cfg.get(k) is not None and have_cfg.get(k) != want_cfg.get(k)]
    have_rec, want_rec = plain(ckpt.get("recipe", {})), plain(dataclasses.asdict(cfg.recipe))
    differ += [f"recipe {k}: {have_rec.get(k)!r} -> {want_rec.get(k)!r}"
               for k in sorted(set(have_rec) | set(want_rec)) if k not in _RESUME_FREE and have_rec.get(k) != want_rec.get(k)]
    if ckpt.get("train", {}).get("seed", cfg.seed) != cfg.seed:
        differ.append(f"seed: {ckpt['train']['seed']} -> {cfg.seed}")
    if differ:
        raise RefbenchError(f"{path}: cannot resume with another configuration ({'; '.join(differ)})",
                            hint="resume with the run's own flags (see its config.json), or train a new run with another --out")


def _write_run_config(cfg: TrainConfig, manifest: dict, context: dict) -> None:
    atomic_write_json(cfg.out / "config.json", {
        "model": cfg.model, "variant": cfg.variant, "dataset": cfg.dataset, "shards": str(cfg.shards),
        "recipe": dataclasses.asdict(cfg.recipe), "seed": cfg.seed, "overrides": cfg.model_overrides,
        "world_size": context["dist"].world, "total_steps": context["total_steps"],
        "steps_per_epoch": context["steps_per_epoch"], "refbench_version": __version__,
    })


class _JsonlLog:
    """Append-only JSON-lines metrics log (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a torn last line from a killed writer
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _check_ranks_agree(net, d: Dist, log: _JsonlLog, rank_pieces: list) -> None:
    """After DDP training, every rank must hold the same weights; record the checksums and
    which train images (shard, first sample, end sample) each rank read in the last epoch."""
    checksum = float(sum(p.detach().double().sum() for p in net.parameters()))
    gathered = all_gather_object(d, (checksum, rank_pieces))
    sums, pieces = [g[0] for g in gathered], [g[1] for g in gathered]
    agree = all(s == sums[0] for s in sums)
    log.write({"event": "end", "param_checksums": sums, "ranks_agree": agree, "train_pieces": pieces})
    if not agree:
        raise RuntimeError(f"ranks diverged: parameter checksums {sums}")
