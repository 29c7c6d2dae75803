"""The quickstart's plans as data (`QuickstartPlan`, `PLANS`: full, check, fast; gres and
gres-fast for `refbench quickstart --task gres`) and how one of
their runs is made: the synthetic data it needs (`synth_data`) and each model's training run
(`train_config`). `refbench quickstart` runs a plan; `refbench bench seeds` runs the full plan
once per seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refbench.data.synth import generate as synth
from refbench.train.config import TrainConfig
from refbench.train.recipes import get_recipe


@dataclass(frozen=True)
class QuickstartPlan:
    images: int  # synthetic images (all datasets share them)
    seed: int  # synth and training seed
    shard_size: int  # images per shard (several train shards, so DataLoader workers share the work)
    dataset: str  # the prepared dataset the models train and are scored on
    models: tuple[str, ...]  # the models trained, in training order
    steps: int  # training steps of every model (the same for all: a like-for-like comparison)
    batch_size: int  # global training batch
    eval_splits: tuple[str, ...]  # splits scored for the leaderboard
    vis: int  # overlay pictures of EAVL on the last eval split
    workers: int  # DataLoader workers of a run (side by side, a run with one thread loads in-process: `side_by_side`)
    task: str = "ris"  # "ris" (RefCOCO metrics, leaderboard, pictures) or "gres" (gRefCOCO: gIoU, cIoU, N-acc, T-acc)
    model_overrides: dict = field(default_factory=dict)  # model name -> config fields set for it (e.g. the no-target head)


# The no-target rule of the gRefCOCO plans: the empty-mask rule (no head: a sentence is no-target
# when its binarised mask is empty), chosen by the seed table (`refbench bench seeds eavl cris blind
# --task gres --seeds 0-3`, the plan's 600 steps, 2 AVX-512 cores, synthetic grefcoco_unc testB, %
# mean +- sd): EAVL gIoU 59.81 +- 1.97 without the head against 38.74 +- 5.54 with it (cIoU 60.21
# vs 41.35), CRIS 62.29 +- 2.09 against 52.79 +- 1.20 (cIoU 62.98 vs 52.54); 300 steps agreed. The
# head recognises more no-target sentences (N-acc 88.9 / 88.2 against 65.7 / 58.3) but loses more
# targeted ones (T-acc 93.9 / 94.2 against 98.1 / 99.2) and its loss costs the masks.
# `--set nt_head=true` turns it on.
GRES_NT_HEAD: dict[str, dict] = {}


PLANS: dict[str, QuickstartPlan] = {
    "full": QuickstartPlan(images=2000, seed=0, shard_size=200, dataset="refcoco_unc",
                           models=("eavl", "cris", "blind"), steps=600, batch_size=32,
                           eval_splits=("val", "testA", "testB"), vis=6, workers=1),
    # `check`: the quality test's shorter run (same data, fewer steps, testB only): grounding is
    # already clearly learned, and the language-blind control stays low
    "check": QuickstartPlan(images=2000, seed=0, shard_size=200, dataset="refcoco_unc",
                            models=("eavl", "blind"), steps=300, batch_size=32,
                            eval_splits=("testB",), vis=0, workers=1),
    "fast": QuickstartPlan(images=120, seed=0, shard_size=20, dataset="refcoco_unc",
                           models=("eavl", "cris", "blind"), steps=6, batch_size=8,
                           eval_splits=("val", "testB"), vis=3, workers=1),
    # `refbench quickstart --task gres`: the full plan's data and length on synthetic gRefCOCO
    # (~10% no-target, ~30% multi-target sentences); blind's N-acc is the chance reference
    "gres": QuickstartPlan(images=2000, seed=0, shard_size=200, dataset="grefcoco_unc",
                           models=("eavl", "cris", "blind"), steps=600, batch_size=32,
                           eval_splits=("val", "testA", "testB"), vis=0, workers=1, task="gres",
                           model_overrides=GRES_NT_HEAD),
    "gres-fast": QuickstartPlan(images=120, seed=0, shard_size=20, dataset="grefcoco_unc",
                                models=("eavl", "cris", "blind"), steps=6, batch_size=8,
                                eval_splits=("val", "testB"), vis=0, workers=1, task="gres",
                                model_overrides=GRES_NT_HEAD),
}


def synth_data(data: Path, plan: QuickstartPlan, console) -> None:
    """Write the synthetic dataset unless this exact one (images, seed, generator config) is there."""
    if synth.written_identity(data) == synth.identity(plan.images, plan.seed) and synth.is_complete(data):
        console.print(f"{data}: synthetic dataset already written (images {plan.images}, seed {plan.seed})")
        return
    synth.main(out=data, images=plan.images, seed=plan.seed)


def train_config(model: str, steps: int, plan: QuickstartPlan, shards: Path, out: Path, seed: int | None = None,
                 overrides: dict | None = None) -> TrainConfig:
    """The training run of one quickstart model: tiny variant, `steps` steps, one validation at the
    end; trained with the plan's seed unless `seed` says otherwise (`refbench bench seeds`), with
    the plan's `model_overrides` for the model and then the config `overrides` (`--set`, which win)."""
    recipe = get_recipe("tiny", steps=steps, batch_size=plan.batch_size, workers=plan.workers, val_every=steps)
    return TrainConfig(model=model, variant="tiny", dataset=plan.dataset, shards=shards, recipe=recipe, out=out,
                       seed=plan.seed if seed is None else seed,
                       model_overrides={**plan.model_overrides.get(model, {}), **(overrides or {})})
