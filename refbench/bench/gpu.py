"""`refbench bench gpu`: the GPU path measured on one GPU (EAVL and CRIS, rn101, 480 px, bf16).

    refbench bench gpu --out DIR          # rows as a table, DIR/bench.json and DIR/bench.md

Rows (each names model, backbone, input size, precision and batch):
- train: optimiser steps per second x batch = samples/s and peak memory (torch.cuda
  max_memory_allocated) of EAVL and CRIS at per-GPU batch 8, 16 and 32, on device-resident
  batches (uint8 images normalised on the device, as `data.to_device` does), fused AdamW,
  bf16 autocast, channels_last; a batch that does not fit is a row saying OOM, not a crash;
- channels_last: the same step with NCHW images, as the ratio channels_last / NCHW (it pays
  when > 1; `train` uses channels_last on CUDA);
- data wait: share of a training step's wall time spent waiting for the next batch of the
  real train loader (COCO-like synthetic shards at 480, N DataLoader workers, pinned memory,
  non_blocking copies), EAVL at batch 16;
- eval: sentences per second of `evaluate.score_split` (the code of `refbench eval`: eval
  loader, forward in float32 as CRIS evaluates, I/U counted on the GPU at the original size)
  and its metric share.

Random-init weights (no download); timings only, no quality. Without a CUDA device the
benchmark prints one line saying so and returns no rows. It runs from a source tree or a
wheel on torch >= 2.4 (the GPU machine may have another torch than this project pins), takes
about two minutes on an H100, and imports nothing that `refbench eval` does not.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch

from refbench import models as zoo
from refbench.bench.common import BenchSettings, prepared_set
from refbench.bench.common import row as _row
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.eval import evaluate

GPU_VARIANT = "rn101"  # backbone of the GPU rows (the paper's main one)
GPU_MODELS = ("eavl", "cris")  # models measured
GPU_BATCHES = (8, 16, 32)  # per-GPU training batches
GPU_STEPS = 6  # timed optimiser steps per setting
GPU_WARMUP = 3  # untimed steps first (cuDNN autotuning, allocator warm-up)
LOADER_WORKERS = (2, 6)  # DataLoader workers of the data-wait rows
LOADER_STEPS = 12  # timed steps of the data-wait rows
LOADER_BATCH = 16  # per-GPU batch of the data-wait rows
EVAL_BATCH = 32  # eval batch of the eval row
EVAL_WORKERS = 6  # eval loader workers of the eval row
GPU_IMAGES = 240  # COCO-like synthetic images for the data-wait and eval rows (val: ~1/10 of them)
CONTEXT = 17  # token context length of the synthetic batches (RefCOCO)


def gpu_device() -> Any:
    """torch.device("cuda") when one is usable, else None."""
    return torch.device("cuda") if torch.cuda.is_available() else None


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (torch.cuda.OutOfMemoryError, or the older RuntimeError text)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def free_memory(device: Any) -> None:
    gc.collect()
    if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


def synthetic_batch(batch: int, size: int, device: Any, seed: int = 0) -> dict:
    """A loader-shaped train batch on `device`: uint8 images + content, tokens, uint8 masks."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, CONTEXT, dtype=torch.int64)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49400, (batch, 5), generator=g), 49407
    content = torch.tensor([[60, 0, size - 120, size]] * batch)  # a 4:3 letterbox
    return {
        "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "content": content.to(device),
        "tokens": tokens.to(device),
        "mask": (torch.rand(batch, 1, size, size, generator=g) > 0.7).to(torch.uint8).to(device),
    }


def make_step(net, device: Any, amp_dtype: Any, channels_last: bool) -> Callable[[dict], float]:
    """One optimiser step of `net` on a batch (as `refbench train` does it); returns the loss."""

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step(batch: dict) -> float:
        on = data.to_device(batch, device, channels_last=channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net(on["image"], on["tokens"])
            loss = net.loss(out, on["mask"])["loss"]
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _sync(device: Any) -> None:
    if device.type == "cuda":
            torch.cuda.synchronize(device)


def time_steps(step: Callable[[dict], Any], batch: dict, device: Any, steps: int, warmup: int) -> float:
    """Seconds per step, median of `steps` after `warmup` (device synchronised around each)."""
    for _ in range(warmup):
        step(batch)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_train(build: Callable[[], Any], batch: int, size: int, device: Any, amp_dtype: Any, channels_last: bool,
                  steps: int = GPU_STEPS, warmup: int = GPU_WARMUP) -> dict:
    """{"samples_s", "peak_gib", "oom"} of training a fresh `build()` at `batch`; OOM is a result, not a crash."""
    net = step = data = None
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        net = build().to(device).train()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        data = synthetic_batch(batch, size, device)
        step = make_step(net, device, amp_dtype, channels_last)
        seconds = time_steps(step, data, device, steps, warmup)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan
        return {"samples_s": batch / seconds, "peak_gib": peak, "oom": False}
    except Exception as e:  # noqa: BLE001 - only OOM is a result; everything else is re-raised
        if not is_oom(e):
            raise
        return {"samples_s": math.nan, "peak_gib": math.nan, "oom": True}
    finally:
        del net, step, data
        free_memory(device)


def _gpu_name(device: Any) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_rows(device: Any, models: tuple[str, ...] = GPU_MODELS, variant: str = GPU_VARIANT,
               batches: tuple[int, ...] = GPU_BATCHES, amp_dtype: Any = "bf16", steps: int = GPU_STEPS,
               warmup: int = GPU_WARMUP) -> list[dict]:
    """Training samples/s and peak memory per model and batch, plus channels_last vs NCHW."""

    amp = torch.bfloat16 if amp_dtype == "bf16" else amp_dtype
    precision = "bf16" if amp is torch.bfloat16 else str(amp)
    rows = []
    for name in models:
        size = zoo.make_config(name, variant).image_size  # the variant's input side (480 for rn101)

        def build(name=name):
            torch.manual_seed(0)
            return zoo.build(name, variant, pretrained=None)

        results = {b: measure_train(build, b, size, device, amp, True, steps, warmup) for b in batches}
        first = next((r["samples_s"] for r in results.values() if not r["oom"]), math.nan)
        for b, r in results.items():
            what = (f"{name} {variant} {size} px {precision} train samples/s, per-GPU batch {b}: "
                    + ("OOM (does not fit)" if r["oom"] else f"peak memory {r['peak_gib']:.1f} GiB")
                    + f" ({_gpu_name(device)}, channels_last, fused AdamW, median of {steps} steps)")
            row = _row("gpu", what, r["samples_s"], first, None, baseline_is=f"the same at batch {batches[0]} (scaling)")
            row.update(peak_gib=r["peak_gib"], oom=r["oom"], model=name, batch=b, kind="train")
            rows.append(row)
        fitting = [b for b, r in results.items() if not r["oom"]]
        if fitting:
            b = 16 if 16 in fitting else fitting[0]
            nchw = measure_train(build, b, size, device, amp, False, steps, warmup)
            cl = results[b]["samples_s"]
            rows.append(_row("gpu", f"{name} {variant} {size} px {precision} train samples/s, batch {b}, channels_last vs NCHW "
                             f"(pays when ratio > 1)", cl, nchw["samples_s"], None, baseline_is="NCHW (contiguous) images and weights"))
    return rows


def data_wait_rows(device: Any, s: BenchSettings, workers: tuple[int, ...] = LOADER_WORKERS,
                   variant: str = GPU_VARIANT, steps: int = LOADER_STEPS, batch: int = LOADER_BATCH) -> list[dict]:
    """Share of EAVL training wall time spent waiting for the real loader, per worker count."""

    folder = prepared_set(s, "coco-like")
    amp = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    torch.manual_seed(0)
    net = zoo.build("eavl", variant, pretrained=None).to(device).train()
    size = net.image_size
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    step = make_step(net, device, amp, device.type == "cuda")
    try:
        for n in workers:
            loader = train_stream.train_loader(folder, batch_size=batch, image_size=size, num_batches=10**9, seed=0, workers=n,
                                       pin_memory=device.type == "cuda")
            it = iter(loader)
            for _ in range(GPU_WARMUP + n):  # fill every worker's pipeline
                step(next(it))
            _sync(device)
            wait = total = 0.0
            for _ in range(steps):
                t0 = time.perf_counter()
                b = next(it)
                t1 = time.perf_counter()
                step(b)
                _sync(device)
                wait += t1 - t0
                total += time.perf_counter() - t0
            del it
            what = (f"eavl {variant} {size} px train data-wait share, {n} loader workers, batch {batch}, pinned + non_blocking "
                    f"(coco-like synth, {_gpu_name(device)}, {steps} steps: {batch * steps / total:.1f} samples/s)")
            rows.append(_row("gpu", what, wait, total, None, baseline_is="wall time of the steps (share = ours / baseline)"))
    finally:
        del net, step
        free_memory(device)
    return rows


def eval_rows(device: Any, s: BenchSettings, variant: str = GPU_VARIANT, batch: int = EVAL_BATCH,
              workers: int = EVAL_WORKERS) -> list[dict]:
    """Sentences/s of `evaluate.score_split` (EAVL, original protocol) and its metric share."""

    folder = prepared_set(s, "coco-like")
    manifest = data.load_manifest(folder)
    torch.manual_seed(0)
    net = zoo.build("eavl", variant, pretrained=None).to(device)
    d = SimpleNamespace(rank=0, world=1, device=device)
    try:
        evaluate.score_split(net, folder, manifest, "val", d, batch_size=batch, workers=workers, max_batches=2)
        scores = evaluate.score_split(net, folder, manifest, "val", d, batch_size=batch, workers=workers)
    finally:
        del net
        free_memory(device)
    n = len(scores)
    what = (f"eavl {variant} eval sentences/s, coco-like synth val ({n} sentences), protocol original, batch {batch}, "
            f"{workers} loader workers, float32 as `refbench eval` runs it, I/U on the device ({_gpu_name(device)}); metric share "
            f"{100 * scores.seconds_metric / scores.seconds_total:.1f}%")
    return [_row("gpu", what, n / scores.seconds_total, 1.0, None, baseline_is="1 (sentences/s is the number)")]


def bench_gpu(s: BenchSettings) -> list[dict]:
    """All GPU rows, or none (one line printed) without a CUDA device."""
    device = gpu_device()
    if device is None:
        print("refbench bench gpu: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
        return []
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    s = dataclasses.replace(s, images=min(s.images, GPU_IMAGES))
    rows = train_rows(device)
    rows += data_wait_rows(device, s)
    rows += eval_rows(device, s)
    return rows
