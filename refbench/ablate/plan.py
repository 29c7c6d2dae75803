"""The ablation plan of `refbench ablate`: its settings, the rows of the paper's Tables 2-4, the runs they need.

Pure data and functions (no training, no I/O): `table_rows` lists each reproduced row with the
row it is compared with, `plan_runs` trains each distinct setting once (Nq=24 dynamic with F_vg
and MQE is every table's full model, so the default plan is 12 runs, not 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from refbench.train.recipes import Recipe, get_recipe

# Steps per run. Measured: `refbench ablate` with the defaults took 33.4 min on 2 idle cores
# (12 runs, ~2.8 min each: 400 tiny EAVL steps, 4 validations and the testA scoring). At 400
# steps (~3.4 epochs of the synthetic train refs) the full model reaches 58% testA mIoU and
# Table 4's signs match the paper's; Table 2's Nq effects are below one seed's run-to-run noise.
# val mIoU is still climbing: enough to learn, not to converge.
DEFAULT_STEPS = 400


@dataclass(frozen=True)
class AblationConfig:
    workdir: Path  # data/, shards/, runs/, results/, report.md and the plot go here
    steps: int = DEFAULT_STEPS  # optimiser steps per run
    batch_size: int | None = None  # global batch per step; None = the recipe's (tiny: 32)
    num_queries: tuple[int, ...] = (1, 4, 8, 16, 24, 32)  # Table 2's Nq sweep (the paper also has Nq=2)
    fixed_queries: tuple[int, ...] = (8, 16, 24)  # Table 3: dynamic vs fixed aligner at these Nq
    default_queries: int = 24  # the full model's Nq: Table 2's reference, Table 4's 2x2 runs at it
    model: str = "eavl"  # registry name of the ablated model
    variant: str = "tiny"  # backbone variant
    recipe: str = "tiny"  # training recipe (refbench.train.recipes), --steps overrides its length
    dataset: str = "refcoco+_unc"  # prepared dataset trained and scored on
    split: str = "testA"  # scored split (the paper's: RefCOCO+ testA)
    protocol: str = "original"  # metric protocol of the records (refbench.eval.metrics.PROTOCOLS)
    seed: int = 0  # training seed (model init and data stream), the same for every run
    data_seed: int = 0  # `refbench synth` seed
    synth_images: int | None = None  # synthetic images; None = refbench.data.synth.DEFAULT_IMAGES
    shards: Path | None = None  # an already prepared shard root to use instead of WORKDIR/shards
    workers: int | None = None  # DataLoader workers (train and eval); None = the recipe's
    eval_batch_size: int = 32  # sentences per forward pass when scoring
    bootstrap_samples: int = 2000  # resamples of the paired bootstrap behind each delta's CI


@dataclass(frozen=True, order=True)
class Setting:
    """One model configuration of the ablation (the part of a table row that is trained)."""

    num_queries: int  # N_q
    aligner: str  # "dynamic" (Vision-Language Aligner) or "fixed" (a fixed-kernel conv, Table 3)
    global_vision: bool  # F_vg used in eq 8
    estimator: bool  # Multi-Query Estimator (eq 13); False with the fixed aligner, which replaces it

    @property
    def name(self) -> str:
        """Readable and unique: nq24-dynamic, nq24-dynamic-novg-nomqe, nq8-fixed."""
        parts = [f"nq{self.num_queries}", self.aligner]
        if not self.global_vision:
            parts.append("novg")
        if not self.estimator and self.aligner == "dynamic":
            parts.append("nomqe")
        return "-".join(parts)

    @property
    def label(self) -> str:
        """For tables: "Nq=24, dynamic aligner, F_vg on, MQE off"."""
        mqe = "MQE on" if self.estimator else "MQE off"
        return f"Nq={self.num_queries}, {self.aligner} aligner, F_vg {'on' if self.global_vision else 'off'}, {mqe}"

    def overrides(self) -> dict[str, Any]:
        """Model config fields (models.eavl.EAVLConfig) of this setting."""
        return {"num_queries": self.num_queries, "aligner": self.aligner,
                "global_vision": self.global_vision, "estimator": self.estimator}


@dataclass(frozen=True)
class Row:
    """One row of one of the paper's tables, and the row it is compared with in that table."""

    table: int  # 2 (Nq), 3 (aligner), 4 (F_vg x MQE)
    setting: Setting  # what is trained for this row
    reference: Setting  # the row's comparison partner (itself for a table's reference row)


@dataclass(frozen=True)
class Run:
    """One training + scoring job: a setting shared by one or more rows."""

    setting: Setting
    tables: tuple[int, ...]  # the tables that use it
    name: str  # run folder and the record's run name: <setting.name>-s<steps>


def full_model(cfg: AblationConfig) -> Setting:
    """The paper's default EAVL: Nq=24, Vision-Language Aligner, F_vg and MQE on."""
    return Setting(cfg.default_queries, "dynamic", True, True)


def table_rows(cfg: AblationConfig) -> list[Row]:
    """The rows of Tables 2-4 this ablation reproduces, each with its comparison partner."""
    full = full_model(cfg)
    rows = [Row(2, Setting(nq, "dynamic", True, True), full) for nq in cfg.num_queries]
    for nq in cfg.fixed_queries:
        dynamic = Setting(nq, "dynamic", True, True)
        rows += [Row(3, dynamic, dynamic), Row(3, Setting(nq, "fixed", True, False), dynamic)]
    rows += [Row(4, Setting(cfg.default_queries, "dynamic", vg, mqe), full)
             for vg, mqe in ((True, True), (False, True), (True, False), (False, False))]
    return rows


def plan_runs(cfg: AblationConfig, rows: Sequence[Row] | None = None) -> list[Run]:
    """One run per distinct setting of `rows`, the full model first (every table's reference)."""
    rows = table_rows(cfg) if rows is None else rows
    tables: dict[Setting, list[int]] = {}
    for row in rows:
        for s in (row.setting, row.reference):
            t = tables.setdefault(s, [])
            if row.table not in t:
                t.append(row.table)
    full = full_model(cfg)
    order = sorted(tables, key=lambda s: (s != full, list(tables).index(s)))
    return [Run(s, tuple(sorted(tables[s])), f"{s.name}-s{cfg.steps}") for s in order]


def recipe(cfg: AblationConfig) -> Recipe:
    """The training recipe of every run: `cfg.recipe` cut to `cfg.steps` steps."""
    return get_recipe(cfg.recipe, steps=cfg.steps, batch_size=cfg.batch_size, workers=cfg.workers)
