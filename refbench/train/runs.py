"""Run folders: `refbench train`'s entry point (flags -> TrainConfig -> the loop) and the one rule
by which quickstart, ablate and bench reuse, resume or redo a run (`run_state`, `ensure_trained`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from refbench import checkpoint, models, remote
from refbench.data import shards as data
from refbench.data.prepare import cap_workers
from refbench.errors import RefbenchError
from refbench.fsutil import check_output_folder
from refbench.train.config import TrainConfig, model_overrides, parse_overrides, run_steps
from refbench.train.loop import train
from refbench.train.recipes import get_recipe

# ------------------------------------------------------------------------------ entry point


def main(model: str, variant: str | None, dataset: str, shards: Path, recipe: str, epochs: int | None,
         steps: int | None, batch_size: int | None, lr: float | None, pretrained: str | None,
         out: Path | None, resume: bool, amp: str | None, workers: int | None, seed: int,
         overrides: tuple[str, ...] = (), backbone_lr_scale: float | None = None) -> Path:
    """CLI entry: turn flags into a TrainConfig and train. Returns the run folder."""
    models.get_spec(model)  # one line for an unknown model or a broken plug-in, before any work
    rec = get_recipe(recipe, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, amp=amp,
                     workers=cap_workers(workers), backbone_lr_scale=backbone_lr_scale)
    if pretrained is not None:
        rec = dataclasses.replace(rec, pretrained=None if pretrained.lower() in ("none", "") else pretrained)
    variant = variant or rec.variant
    cfg = TrainConfig(
        model=model, variant=variant, dataset=dataset, shards=shards if remote.is_url(shards) else Path(shards), recipe=rec,
        out=Path(out) if out else Path("runs") / f"{model.replace(':', '.')}-{variant}-{dataset}",
        resume=resume, seed=seed, model_overrides=parse_overrides(overrides),
    )
    check_output_folder(cfg.out, "--out")
    models.make_config(model, variant, **model_overrides(cfg))  # type and range of every --set, before any work
    _note_slow_amp(rec.amp)
    return train(cfg)


def _note_slow_amp(amp: str) -> None:
    """Say so when an autocast mode is asked for on CPU, where it is emulated and much slower."""
    import sys

    import torch

    if amp in ("fp16", "bf16") and not torch.cuda.is_available():
        print(f"note: --amp {amp} on CPU runs emulated half-precision kernels, many times slower than "
              "--amp off (the CPU default)", file=sys.stderr)


# ------------------------------------------------------------------------------ run state


RUN_STATES = ("new", "resume", "done", "stale")  # what `run_state` can say about a run folder
_SAME_RECIPE = ("steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "pretrained")


@dataclass(frozen=True)
class RunState:
    """What a run folder holds relative to the run a TrainConfig asks for."""

    state: str  # one of RUN_STATES: new (nothing to continue), resume, done (finished, best.pt there), stale
    reason: str  # why, in words, naming the run folder
    step: int | None = None  # the step of its last.pt (None: no readable last.pt)


def _config_key(config: dict, want: dict) -> str:
    """A model config as comparable text: every field, except those `want` leaves to the build (None,
    e.g. quick_gelu decided from the weights and recorded in the checkpoint)."""
    fields = {k: v for k, v in config.items() if not (k in want and want[k] is None)}
    return json.dumps(json.loads(json.dumps(fields)), sort_keys=True)


def run_state(cfg: TrainConfig) -> RunState:
    """Decide whether `cfg.out` is a new run, one to resume, a finished one, or one made from something else.

    The one rule quickstart, ablate and bench apply to their run folders (`ensure_trained`):
    stale = its last.pt is unreadable, or was made by another model / variant / config / seed,
    from other shards (manifest sha256) or with another recipe (steps, epochs, batch, lr, ...),
    or it finished without a best.pt. Nothing is changed on disk.
    """
    out, last = Path(cfg.out), Path(cfg.out) / "last.pt"
    if not last.is_file():
        return RunState("new", f"{out}: no last.pt yet")
    try:
        ckpt = checkpoint.load(last)
    except RefbenchError as e:
        return RunState("stale", f"{last}: {e.message}")
    manifest = data.load_manifest(remote.join(cfg.shards, cfg.dataset))
    want_config = dataclasses.asdict(models.make_config(cfg.model, cfg.variant, **{**cfg.model_overrides,
                                                                                   "pretrained": cfg.recipe.pretrained}))
    have_recipe, want_recipe = ckpt.get("recipe") or {}, dataclasses.asdict(cfg.recipe)
    step = ckpt.get("step")
    checks = [
        ("model", f"{ckpt['model'].get('name')}/{ckpt['model'].get('variant')}", f"{cfg.model}/{cfg.variant}"),
        ("model config", _config_key(ckpt["model"].get("config") or {}, want_config), _config_key(want_config, want_config)),
        ("dataset", (ckpt.get("dataset") or {}).get("name"), cfg.dataset),
        ("shards (manifest sha256)", (ckpt.get("dataset") or {}).get("manifest_sha256"),
         remote.sha256(remote.join(cfg.shards, cfg.dataset, "manifest.json"))),
        ("seed", (ckpt.get("train") or {}).get("seed"), cfg.seed),
        *[(f"recipe {k}", have_recipe.get(k), want_recipe[k]) for k in _SAME_RECIPE],
    ]
    for what, have, want in checks:
        if have != want:
            detail = f" ({have} != {want})" if len(f"{have}{want}") <= 60 else ""
            return RunState("stale", f"{out}: made with another {what}{detail}", step)
    if ckpt.get("optimizer") is None:
        return RunState("stale", f"{out}: last.pt holds weights only and cannot be continued", step)
    total = run_steps(cfg, manifest)
    if step >= total:
        if not (out / "best.pt").is_file():
            return RunState("stale", f"{out}: finished (step {step}) but best.pt is missing", step)
        return RunState("done", f"{out}: finished at step {step}", step)
    return RunState("resume", f"{out}: at step {step} of {total}", step)


def ensure_trained(cfg: TrainConfig, say=print) -> tuple[RunState, Path]:
    """Bring `cfg.out` to a finished run by the one policy, and return (its state before, best.pt).

    new: train; resume: continue from last.pt; done: reuse; stale: say why, delete the run folder
    and train it again. Quickstart, ablate and bench call this for every run they own.
    """
    state = run_state(cfg)
    if state.state == "done":
        return state, Path(cfg.out) / "best.pt"
    if state.state == "stale":
        say(f"{state.reason}; training it again")
        shutil.rmtree(cfg.out)
    train(dataclasses.replace(cfg, resume=state.state == "resume"))
    best = Path(cfg.out) / "best.pt"
    if not best.is_file():
        raise RefbenchError(f"{cfg.out}: training finished without a best.pt")
    return state, best
