"""Training recipes as data, and the learning-rate schedule as a pure function.

A recipe is everything about *how* a model is trained that does not belong to the model:
optimiser, schedule, batch, epochs, validation cadence. Command-line flags override single
fields (`--lr`, `--epochs`, ...); nothing branches on a recipe's name.

`paper` is EAVL section 4.1: 480x480 input, Adam at 1e-5 with polynomial decay, a global batch of
64 across all ranks, 100 epochs, CLIP weights from open_clip's "openai" tag. How it reads the
paper's "a learning rate of 1e-5": as CRIS's `base_lr`, the rate of everything but the CLIP
encoders, with CRIS's `lr_multi` 0.1 on the encoders (1e-6) and their positional embeddings at
the base rate. Reasons: EAVL is built on CRIS's code (its decoder sizes, word lengths 17/22
and training set-up are CRIS's config values), whose optimiser has exactly these two rates and
whose config states one number, base_lr; a paper written from that config reports that
number. The other reading, 1e-5 for the whole network, is one flag: `--backbone-lr-scale 1`.

`cris` is CRIS's own RefCOCO recipe as its configs (config/refcoco/cris_r*.yaml) and train.py
give it: 416x416 input, Adam with no weight decay, base lr 1e-4 with the CLIP encoders at 0.1x
(positional embeddings excepted), MultiStepLR x0.1 at epoch 35 of 50, global batch 64, no
gradient clipping, fp16 autocast with a GradScaler. The word length is the shards' (17 for
RefCOCO/RefCOCO+, 22 for G-Ref: `refbench prepare` cuts at those, as CRIS's configs do).

Both CRIS and EAVL score with CRIS's evaluation chain, so `cris` and `paper` train on that
chain's preprocessing and validate under the `cris` protocol (`protocol`; refbench.data.cvwarp).
`tiny` is what the CPU quickstart needs: the tiny backbone from random init, a higher learning
rate with warm-up, and a step budget that fits in minutes on 2 cores (refbench's own
antialiased letterbox, `original` protocol). Its lr, 6e-4: a sweep of the quickstart's 500-step
EAVL run (GPU, fp32, seed 0) fell with every step up from it (testB mIoU 53.5% at 6e-4, 46.4%
at 1e-3, 38.7% at 1.5e-3, 30.9% at 2e-3, 12.5% at 3e-3), and lower was no better on 2 CPU
cores (the quickstart's then 500 steps one after another, at 4e-4: EAVL 57.8%, CRIS 60.3%; at
6e-4: 58.3%, 61.8%; EAVL's 500 steps on one thread, seeds 0-2: 55.7 / 59.1 / 57.8% at 6e-4,
60.6 / 56.4 / 55.6% at 4e-4; seeds 0-1 at 3e-4: 59.0 / 54.9%).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refbench.distributed import AMP_MODES  # the values of Recipe.amp (refbench.distributed.autocast_dtype)


@dataclass(frozen=True)
class Recipe:
    name: str  # recipe name, recorded in checkpoints and result records
    variant: str  # default model variant (backbone) for this recipe
    pretrained: str | None  # open_clip tag or local file for the CLIP weights; None = random init
    epochs: int  # passes over the train refs (in expectation); ignored when `steps` is set
    steps: int | None  # total optimiser steps; overrides `epochs` when set
    batch_size: int  # GLOBAL batch: per-rank batch = batch_size / (world_size * grad_accum)
    grad_accum: int  # micro-batches accumulated per optimiser step on each rank
    lr: float  # peak (base) learning rate (Adam): the rate of everything but the CLIP encoders
    backbone_lr_scale: float  # lr multiplier for the CLIP encoders (1.0 = same lr everywhere; CRIS's lr_multi 0.1)
    backbone_lr_exempt: tuple[str, ...]  # encoder parameters whose name contains one of these keep the base lr (CRIS: positional_embedding)
    weight_decay: float  # Adam(W) weight decay; 0 = plain Adam as in the paper
    lr_power: float  # polynomial decay power: lr = peak * (1 - progress) ** power (when lr_milestones is empty)
    lr_milestones: tuple[float, ...]  # step decay instead: lr x lr_decay at each of these fractions of training (CRIS: 35/50 epochs = 0.7)
    lr_decay: float  # factor applied at each milestone (CRIS: 0.1)
    warmup_steps: int  # linear warm-up from 0 to the peak lr over this many steps
    min_lr: float  # floor of the decayed lr
    grad_clip: float | None  # max global grad norm; None = no clipping
    amp: str  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16" or "off"
    workers: int  # DataLoader workers per rank
    val_every: int | None  # validate every N steps; None = at the end of every epoch
    ckpt_every: int  # write last.pt every N steps (and at every validation)
    log_every: int  # progress / JSONL log cadence in steps
    val_max_batches: int | None  # cap on validation batches (None = the whole val split)
    image_size: int | None  # network input side, pixels; None = the variant's (CRIS trains at 416)
    protocol: str  # validation protocol (refbench.eval.metrics.PROTOCOLS); its preprocessing is also the training input
    sync_bn: bool = True  # SyncBatchNorm across ranks on CUDA when world > 1 (CRIS's sync_bn): BN statistics of the global batch


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper", variant="rn101", pretrained="openai", epochs=100, steps=None,
        batch_size=64, grad_accum=1, lr=1e-5, backbone_lr_scale=0.1, backbone_lr_exempt=("positional_embedding",),
        weight_decay=0.0, lr_power=0.9, lr_milestones=(), lr_decay=0.1, warmup_steps=0, min_lr=0.0, grad_clip=None,
        amp="auto", workers=8, val_every=None, ckpt_every=1000, log_every=20, val_max_batches=None,
        image_size=480, protocol="cris",
    ),
    "cris": Recipe(
        name="cris", variant="rn50", pretrained="openai", epochs=50, steps=None,
        batch_size=64, grad_accum=1, lr=1e-4, backbone_lr_scale=0.1, backbone_lr_exempt=("positional_embedding",),
        weight_decay=0.0, lr_power=0.9, lr_milestones=(35 / 50,), lr_decay=0.1, warmup_steps=0, min_lr=0.0,
        grad_clip=None, amp="fp16", workers=8, val_every=None, ckpt_every=1000, log_every=20, val_max_batches=None,
        image_size=416, protocol="cris",
    ),
    "tiny": Recipe(
        name="tiny", variant="tiny", pretrained=None, epochs=12, steps=None,
        batch_size=32, grad_accum=1, lr=6e-4, backbone_lr_scale=1.0, backbone_lr_exempt=(), weight_decay=1e-4,
        lr_power=0.9, lr_milestones=(), lr_decay=0.1, warmup_steps=50, min_lr=1e-5, grad_clip=1.0, amp="auto",
        workers=2, val_every=None, ckpt_every=200, log_every=10, val_max_batches=None,
        image_size=None, protocol="original",
    ),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The named recipe with `overrides` (fields whose value is not None) applied."""
    from refbench.errors import RefbenchError

    if name not in RECIPES:
        raise RefbenchError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        check_recipe_value(key, value)
    return dataclasses.replace(RECIPES[name], **changes)


_POSITIVE_INTS = ("epochs", "steps", "batch_size", "grad_accum")  # counts that must be >= 1
_POSITIVE_FLOATS = ("lr",)  # must be finite and > 0
_FLAG = {"batch_size": "--batch-size"}  # recipe field -> its command-line flag, where the names differ


def check_recipe_value(key: str, value) -> None:
    """Refuse (RefbenchError naming the flag) a recipe override out of its type or range."""
    import math

    from refbench.errors import RefbenchError

    flag = _FLAG.get(key, f"--{key.replace('_', '-')}")
    if key in _POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RefbenchError(f"{flag} must be a whole number >= 1, not {value!r}")
    if key in _POSITIVE_FLOATS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not math.isfinite(value) or value <= 0):
        raise RefbenchError(f"{flag} must be a finite number > 0, not {value!r}", hint="the paper's recipe uses --lr 1e-5")
    if key == "workers" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise RefbenchError(f"{flag} must be a whole number >= 0, not {value!r}")


def get_lr(step: int, total_steps: int, peak: float, warmup_steps: int = 0, power: float = 0.9,
           min_lr: float = 0.0, milestones: tuple[float, ...] = (), decay: float = 0.1) -> float:
    """Learning rate at optimiser step `step` (0-based): linear warm-up, then polynomial decay,
    or, with `milestones` (fractions of `total_steps`), peak x decay ** (milestones passed).

    Pure: the same arguments always give the same rate, so a resumed run continues with
    exactly the rate an uninterrupted run would use. A milestone m is passed from step
    round(m * total_steps) on (CRIS's MultiStepLR at epoch 35 of 50: m = 0.7).
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if milestones:
        passed = sum(1 for m in milestones if step >= round(m * total_steps))
        return max(min_lr, peak * decay**passed)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return max(min_lr, peak * (1.0 - progress) ** power)


def recipe_lr(rec: Recipe, step: int, total_steps: int) -> float:
    """`get_lr` with the recipe's schedule fields."""
    return get_lr(step, total_steps, rec.lr, rec.warmup_steps, rec.lr_power, rec.min_lr, rec.lr_milestones, rec.lr_decay)
