"""A training run as data: `TrainConfig` (what to train, on what, with which recipe, where) and the
`--set FIELD=VALUE` overrides it carries to the model config."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refbench.data import shards as data
from refbench.errors import RefbenchError
from refbench.train.recipes import Recipe


@dataclass
class TrainConfig:
    model: str  # registry name: eavl, cris, blind, ...
    variant: str  # model variant (backbone): tiny, rn50, rn101, vitb16, vitl14, ...
    dataset: str  # prepared dataset folder name under `shards`, e.g. refcoco_unc
    shards: str | Path  # shard root written by `refbench prepare`: a folder or a URL (refbench.remote)
    recipe: Recipe  # optimiser / schedule / batch / cadence (refbench.train.recipes)
    out: Path  # run folder: last.pt, best.pt, log.jsonl, curves.png, config.json
    resume: bool = False  # continue from out/last.pt
    seed: int = 0  # seeds the model init and the data stream
    model_overrides: dict = field(default_factory=dict)  # model config fields, e.g. {"num_queries": 8}
    stop_after: int | None = None  # stop (after a checkpoint) once this process has run N steps; for tests/preemption
    quiet: bool = False  # no progress bar (logs still written)


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`("num_queries=8", "aligner=fixed")` -> `{"num_queries": 8, "aligner": "fixed"}`."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RefbenchError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set num_queries=8")
        try:
            parsed[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value  # a bare word is a string: aligner=fixed
    return parsed


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields the run sets on top of its variant: the recipe's input size (e.g. CRIS's
    416), the `--set` overrides and the recipe's pretrained weights."""
    image_size = {"image_size": cfg.recipe.image_size} if cfg.recipe.image_size else {}
    return {**image_size, **cfg.model_overrides, "pretrained": cfg.recipe.pretrained}


def run_steps(cfg: TrainConfig, manifest: dict) -> int:
    """Optimiser steps of the whole run: the recipe's steps, or epochs x steps per epoch."""
    return cfg.recipe.steps or cfg.recipe.epochs * data.steps_per_epoch(manifest, "train", cfg.recipe.batch_size)
