"""Training recipes as data, and the learning-rate schedule as a pure function.

A recipe is everything about *how* a model is trained that does not belong to the model:
optimiser, schedule, batch, epochs, validation cadence. Command-line flags override single
fields (`--lr`, `--epochs`, ...); nothing branches on a recipe's name.

`paper` is EAVL section 4.1: 480x480 input, Adam at 1e-5 with polynomial decay, a global batch of
64 across all ranks, 100 epochs, CLIP weights from open_clip's "openai" tag. `tiny` is what the
CPU quickstart needs: the tiny backbone from random init, a higher learning rate with warm-up,
and a step budget that fits in minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str  # recipe name, recorded in checkpoints and result records
    variant: str  # default model variant (backbone) for this recipe
    pretrained: str | None  # open_clip tag or local file for the CLIP weights; None = random init
    epochs: int  # passes over the train refs (in expectation); ignored when `steps` is set
    steps: int | None  # total optimiser steps; overrides `epochs` when set
    batch_size: int  # GLOBAL batch: per-rank batch = batch_size / (world_size * grad_accum)
    grad_accum: int  # micro-batches accumulated per optimiser step on each rank
    lr: float  # peak learning rate (Adam)
    backbone_lr_scale: float  # lr multiplier for the CLIP encoders (1.0 = same lr everywhere)
    weight_decay: float  # Adam(W) weight decay; 0 = plain Adam as in the paper
    lr_power: float  # polynomial decay power: lr = peak * (1 - progress) ** power
    warmup_steps: int  # linear warm-up from 0 to the peak lr over this many steps
    min_lr: float  # floor of the decayed lr
    grad_clip: float | None  # max global grad norm; None = no clipping
    amp: str  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16" or "off"
    workers: int  # DataLoader workers per rank
    val_every: int | None  # validate every N steps; None = at the end of every epoch
    ckpt_every: int  # write last.pt every N steps (and at every validation)
    log_every: int  # progress / JSONL log cadence in steps
    val_max_batches: int | None  # cap on validation batches (None = the whole val split)
    sync_bn: bool = True  # SyncBatchNorm across ranks on CUDA when world > 1 (CRIS's sync_bn): BN statistics of the global batch


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper", variant="rn101", pretrained="openai", epochs=100, steps=None,
        batch_size=64, grad_accum=1, lr=1e-5, backbone_lr_scale=1.0, weight_decay=0.0,
        lr_power=0.9, warmup_steps=0, min_lr=0.0, grad_clip=None, amp="auto", workers=8,
        val_every=None, ckpt_every=1000, log_every=20, val_max_batches=None,
    ),
    "tiny": Recipe(
        name="tiny", variant="tiny", pretrained=None, epochs=12, steps=None,
        batch_size=32, grad_accum=1, lr=6e-4, backbone_lr_scale=1.0, weight_decay=1e-4,
        lr_power=0.9, warmup_steps=50, min_lr=1e-5, grad_clip=1.0, amp="auto", workers=2,
        val_every=None, ckpt_every=200, log_every=10, val_max_batches=None,
    ),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The named recipe with `overrides` (fields whose value is not None) applied."""
    from refbench.errors import RefbenchError

    if name not in RECIPES:
        raise RefbenchError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(RECIPES[name], **changes)


def get_lr(step: int, total_steps: int, peak: float, warmup_steps: int = 0, power: float = 0.9,
           min_lr: float = 0.0) -> float:
    """Learning rate at optimiser step `step` (0-based): linear warm-up, then polynomial decay.

    Pure: the same arguments always give the same rate, so a resumed run continues with
    exactly the rate an uninterrupted run would use.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return max(min_lr, peak * (1.0 - progress) ** power)
