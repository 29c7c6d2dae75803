"""The train stage: recipes, the one training loop, run folders, runs side by side.

    config          TrainConfig (a run as data), --set overrides, the run's step count
    recipes         named optimiser/schedule/batch recipes (tiny, cris, paper, ...)
    loop            the training loop (`train`), from one CPU process to multi-node GPUs
    runs            `refbench train`'s entry point; run_state / ensure_trained (reuse, resume, redo)
    sidebyside      several runs at once, each scored once trained, with live progress lines
    plans           the quickstart's plans (QuickstartPlan, PLANS), also used by `bench seeds`
    convert         a CRIS.pytorch checkpoint -> a refbench checkpoint

Imports refbench.eval, refbench.data, the root modules and refbench.models; nothing above.
"""

from __future__ import annotations

from refbench import lazy_exports

_EXPORTS = {  # public name -> the module of this package that defines it
    "TrainConfig": "config",
    "parse_overrides": "config",
    "model_overrides": "config",
    "run_steps": "config",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "AMP_MODES": "recipes",
    "get_recipe": "recipes",
    "train": "loop",
    "RunState": "runs",
    "RUN_STATES": "runs",
    "run_state": "runs",
    "ensure_trained": "runs",
    "Job": "sidebyside",
    "JobResult": "sidebyside",
    "run_jobs": "sidebyside",
    "side_by_side": "sidebyside",
    "QuickstartPlan": "plans",
    "PLANS": "plans",
    "train_config": "plans",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
