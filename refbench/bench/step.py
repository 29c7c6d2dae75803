"""`refbench bench step`: where one training step of the tiny models goes, part by part.

For each model (eavl, cris, blind; tiny variant, the `tiny` recipe at the quickstart's batch
of 32, its input size and DataLoader workers) it runs the training step of `refbench train`
itself (`train._optimizer_step`, with the loop's learning-rate update and loss-health
bookkeeping) on the benchmark's synthetic refcoco_unc shards, and measures:

- the plain step: wall seconds per step over `steps` steps after `warmup` steps, no profiler;
- the breakdown: the same number of steps under `torch.profiler`, split into the step's phases
  (the `refbench.step.*` ranges `train._optimizer_step` marks: data wait, to_device, forward,
  loss, backward, diversity figures, gradient clipping, optimiser step) and, for forward and
  backward separately, into the model's parts (the CLIP image and text towers, neck, query
  generator, decoder, aligner or head: `model_parts`). A backward op is charged to the part
  whose forward op created it (autograd's sequence numbers); what no part created (the loss's
  own backward, the autograd engine) is "other".

Rows: `ours` = milliseconds per step in a part, `baseline` = the whole profiled step in
milliseconds, `ratio` = the part's share of the step. The profiler's own overhead is visible as
the profiled step against the plain one (a row of its own). Threads as training uses them:
torch's intra-op threads in the main process (all cores by default), one per loader worker.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from refbench import models
from refbench.bench.common import BenchSettings, cores, prepared_set, row
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.eval.metrics import get_protocol
from refbench.train.recipes import get_recipe, recipe_lr

PHASES = (  # (range name in train._optimizer_step, label)
    ("refbench.step.data_wait", "data wait (next batch from the loader)"),
    ("refbench.step.to_device", "to_device (normalise image, widen mask)"),
    ("refbench.step.forward", "forward"),
    ("refbench.step.loss", "loss"),
    ("refbench.step.backward", "backward"),
    ("refbench.step.diversity", "query-diversity figures"),
    ("refbench.step.clip", "gradient clipping"),
    ("refbench.step.optimizer", "optimizer step (fused AdamW)"),
)
_PART = "refbench.part."  # prefix of the profiler ranges around each model part's forward


def model_parts(net: nn.Module) -> dict[str, nn.Module]:
    """The parts a step is split into: the backbone's towers (image, text), then every other
    top-level child of the model (neck, query generator, decoder, aligner / head, ...)."""
    parts: dict[str, nn.Module] = {}
    for name, child in net.named_children():
        if name == "backbone":
            for sub, tower in child.named_children():
                if tower is not None:
                    parts[f"backbone.{sub}"] = tower
        else:
            parts[name] = child
    return parts


def _mark_parts(parts: dict[str, nn.Module]) -> list:
    """Forward hooks that open a profiler range `refbench.part.NAME` around each part's forward."""
    handles = []
    for name, module in parts.items():
        open_ranges: list = []

        def pre(_m, _inputs, name=name, open_ranges=open_ranges):
            r = torch.autograd.profiler.record_function(_PART + name)
            r.__enter__()
            open_ranges.append(r)

        def post(_m, _inputs, _output, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _part_of(event) -> str | None:
    """The model part whose forward range encloses a profiler event (None: none does)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_PART):
            return parent.name[len(_PART):]
        parent = parent.cpu_parent
    return None


def breakdown(events, steps: int) -> dict[str, dict[str, float]]:
    """Milliseconds per step: {"phase": {range: ms}, "forward": {part: ms}, "backward": {part: ms}}
    from a profiler's event list of `steps` steps."""
    phase: dict[str, float] = defaultdict(float)
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    seq_part: dict[int, str] = {}
    for e in events:
        if e.name.startswith("refbench.step."):
            phase[e.name] += e.cpu_time_total
        elif e.name.startswith(_PART):
            forward[e.name[len(_PART):]] += e.cpu_time_total
        elif e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            part = _part_of(e)
            if part is not None:
                seq_part.setdefault(e.sequence_nr, part)
    for e in events:  # a backward node's evaluation carries the sequence number of the op that made it
        if e.name.startswith("autograd::engine::evaluate_function:"):
            backward[seq_part.get(e.sequence_nr, "other")] += e.cpu_time_total
    per_step = lambda d: {k: v / 1e3 / steps for k, v in d.items()}  # noqa: E731 (microseconds -> ms per step)
    return {"phase": per_step(phase), "forward": per_step(forward), "backward": per_step(backward)}


@dataclasses.dataclass
class StepSetup:
    """What one profiled training run holds: the model, optimiser, batches and the loop's state."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: object  # iterator over train batches
    recipe: object
    step: int = 0


def setup(model: str, folder: Path, *, batch_size: int = 32, workers: int = 1, seed: int = 0,
          total_steps: int = 1000) -> StepSetup:
    """The tiny model, optimiser and train stream exactly as `refbench train MODEL --recipe tiny` builds them."""
    from refbench.train import loop as train

    rec = get_recipe("tiny", steps=total_steps, batch_size=batch_size, workers=workers)
    manifest = data.load_manifest(folder)
    torch.manual_seed(seed)
    net = models.build(model, rec.variant, pretrained=rec.pretrained)
    if train.use_channels_last("cpu"):
        net = net.to(memory_format=torch.channels_last)
    optimizer = train._optimizer(net, rec)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = train_stream.train_loader(folder, manifest, batch_size=batch_size, image_size=net.image_size, seed=seed,
                               num_batches=10**9, workers=workers, preprocess=get_protocol(rec.protocol).preprocess)
    return StepSetup(net, optimizer, scaler, iter(loader), rec)


def run_steps(s: StepSetup, n: int, dist, figures_every: int | None = None) -> float:
    """`n` training steps as the loop runs them (the query-diversity figures on every
    `figures_every`-th step; default the recipe's log cadence, as `train` does); returns the wall seconds."""
    from refbench.train import loop as train

    health = train._LossHealth(dist)
    t0 = time.perf_counter()
    for _ in range(n):
        lr = recipe_lr(s.recipe, s.step, 1000)
        for group in s.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        s.net.train()
        log_now = (s.step + 1) % (figures_every or s.recipe.log_every) == 0
        terms = train._optimizer_step(s.net, s.net, s.optimizer, s.scaler, s.batches, s.recipe, dist, None,
                                      train._Window(), figures=log_now)
        s.step += 1
        health.add(terms["loss"], s.step)
    return time.perf_counter() - t0


def profile_model(model: str, folder: Path, *, steps: int = 10, warmup: int = 5, batch_size: int = 32,
                  workers: int = 1) -> dict:
    """Plain and profiled timing of `steps` training steps of tiny `model` (see the module docstring)."""
    from refbench.distributed import Dist

    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    s = setup(model, folder, batch_size=batch_size, workers=workers)
    run_steps(s, warmup, dist)
    plain = run_steps(s, steps, dist) / steps
    handles = _mark_parts(model_parts(s.net))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run_steps(s, steps, dist) / steps
    finally:
        for h in handles:
            h.remove()
    del s  # stops the loader's worker
    return {"model": model, "plain_s": plain, "profiled_s": profiled, **breakdown(prof.events(), steps)}


def step_rows(result: dict, setting: str) -> list[dict]:
    """Rows (ms per step, share of the profiled step) of one model's `profile_model` result."""
    model, total = result["model"], result["profiled_s"] * 1e3
    rows = [row("step", f"{model}: whole step, no profiler, ms ({setting})", result["plain_s"] * 1e3, total, None,
                baseline_is="the profiled step (the ratio is the profiler's overhead, inverted)")]
    labels = dict(PHASES)
    for name, label in PHASES:
        ms = result["phase"].get(name)
        if ms is None:
            continue
        rows.append(row("step", f"{model}: {label}, ms", ms, total, None, baseline_is="the profiled step"))
        kind = {"refbench.step.forward": "forward", "refbench.step.backward": "backward"}.get(name)
        if kind:
            for part, part_ms in sorted(result[kind].items(), key=lambda kv: -kv[1]):
                rows.append(row("step", f"{model}:   {kind} of {part}, ms", part_ms, total, None,
                                baseline_is="the profiled step"))
    accounted = sum(result["phase"].get(name, 0.0) for name in labels)
    rows.append(row("step", f"{model}: rest of the loop (lr, loss health, Python), ms", max(0.0, total - accounted), total,
                    None, baseline_is="the profiled step"))
    return rows


def bench_step(s: BenchSettings) -> list[dict]:
    """Where a tiny training step goes, for each quickstart model (see the module docstring)."""
    name = list(s.sets)[-1]  # the embedded quickstart data
    folder = prepared_set(s, name)
    rows = []
    for model in s.step_models:
        result = profile_model(model, folder, steps=s.step_steps, warmup=s.step_warmup, batch_size=s.step_batch,
                               workers=s.step_workers)
        setting = (f"tiny, batch {s.step_batch}, {name} synth refcoco_unc, {s.step_workers} loader worker(s), "
                   f"{torch.get_num_threads()} torch threads, {cores()} cores, mean of {s.step_steps} steps after {s.step_warmup}")
        rows += step_rows(result, setting)
    return rows
