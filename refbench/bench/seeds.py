"""`refbench bench seeds MODEL...`: how much a quickstart number moves with the seed, and with the CPU.

One tiny run is not a measurement: tiny training is chaotic, and a run's testB mIoU moves by
points with the seed (and, for a model on the edge of two basins, with the CPU's float
rounding). This trains each MODEL with each seed on the quickstart's data and plan (the full
plan: 2,000 synthetic images, synthetic refcoco_unc, batch 32, the tiny recipe; `--steps`
changes the length), scores each on the plan's splits (protocol original) and prints, per model
and split:

    mIoU     mean over seeds, sample standard deviation, a 95% percentile bootstrap interval of
             the mean (10,000 resamples of the seeds, seed 0), and every seed's value
    figures  means over seeds of the query diversity (models with queries: mask correlation,
             [SOS] attention, with its largest seed value) and of the sentence sensitivity
             (refbench.eval.sensitivity: mask, kernel)

The runs go side by side (refbench.train.sidebyside), one thread each, as many at once as there are
cores. `--set FIELD=VALUE` changes a config field of every MODEL (a candidate reading of a
paper, say); `--isa avx2` runs the children on AVX2 kernels (`sidebyside.ISA_ENV`), so one
machine gives the other CPU kind's numbers, and the table says which capability each ran on.
Runs live in WORKDIR/runs/<isa>/<model>[+<overrides>]/seed<k>, reused while they match (the
run-state rule of every command); the table goes to WORKDIR/seeds.md and seeds.json
(atomically, the previous table kept in seeds.jsonl).

`--task gres`: the quickstart's gRefCOCO plan (`plans.PLANS["gres"]`, synthetic grefcoco_unc);
every model with a no-target head (EAVL, CRIS) is trained with `nt_head=True` and with
`nt_head=False` (the empty-mask rule) unless `--set nt_head=...` picks one; the table gives per
model, rule and split the mean and sample sd over seeds of gIoU, cIoU, N-acc and T-acc (gRefCOCO
protocol original), to WORKDIR/seeds-gres.md and seeds-gres.json.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from refbench.data import prepare
from refbench.errors import RefbenchError
from refbench.eval import results
from refbench.fsutil import atomic_write_json, atomic_write_text
from refbench.train.sidebyside import ISA_ENV, Job, run_jobs

BOOTSTRAP_RESAMPLES = 10_000  # resamples of the seeds for the interval of the mean


@dataclass(frozen=True)
class SeedSettings:
    models: tuple[str, ...]  # registry names, each trained with every seed
    seeds: tuple[int, ...]  # training seeds (the data is the plan's, the same for all)
    steps: int | None  # training steps per run; None = the quickstart's full plan
    overrides: tuple[str, ...]  # FIELD=VALUE model config fields set for every model
    isa: str  # a key of sidebyside.ISA_ENV
    workdir: Path  # data, shards, runs, results and the table
    splits: tuple[str, ...] | None  # splits scored; None = the plan's
    lanes: int | None  # runs at once; None = one per usable core
    task: str = "ris"  # "ris" (synthetic refcoco_unc, mIoU) or "gres" (synthetic grefcoco_unc, both no-target rules)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-3` -> (0, 1, 2, 3); `0,2,5` -> (0, 2, 5); `4` -> (0, 1, 2, 3) (a count)."""
    parts = text.replace(" ", "")
    try:
        if "-" in parts:
            lo, hi = parts.split("-")
            seeds = tuple(range(int(lo), int(hi) + 1))
        elif "," in parts:
            seeds = tuple(int(s) for s in parts.split(","))
        else:
            seeds = tuple(range(int(parts)))
    except ValueError:
        seeds = ()
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise RefbenchError(f"--seeds {text!r}: expected a range (0-3), a list (0,2,5) or a count (4) of distinct seeds >= 0")
    return seeds


def run_tag(model: str, overrides: dict) -> str:
    """`eavl` or `eavl+attend_sos=False+scaled_attention=True`: a run family's name (folders, rows)."""
    return "+".join([model.replace(":", "."), *(f"{k}={v}" for k, v in sorted(overrides.items()))])


def bootstrap_mean_ci(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(per_seed: dict[int, dict]) -> dict:
    """One (model, split)'s seeds -> mean, sd, interval and the figures' means."""
    seeds = sorted(per_seed)
    miou = [per_seed[s]["mIoU"] for s in seeds]
    row = {"seeds": seeds, "mIoU": dict(zip(map(str, seeds), miou)), "mean": statistics.fmean(miou),
           "sd": statistics.stdev(miou) if len(miou) > 1 else 0.0, "ci95": bootstrap_mean_ci(miou)}
    for key in ("sos_attention", "query_mask_corr", "mask_sensitivity", "kernel_sensitivity"):
        vals = [per_seed[s][key] for s in seeds if per_seed[s].get(key) is not None]
        if len(vals) == len(seeds):
            row[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                        "values": dict(zip(map(str, seeds), vals))}
    row["capability"] = sorted({per_seed[s]["capability"] for s in seeds})
    return row


def _figures(record_path: Path) -> dict:
    record = results.load_record(record_path)
    out = {"mIoU": record.metrics["mIoU"], "oIoU": record.metrics["oIoU"]}
    out.update({k: v for k, v in (record.extras.get("query_diversity") or {}).items() if k != "n"})
    out.update({k: v for k, v in (record.extras.get("sentence_sensitivity") or {}).items() if k != "n"})
    return out


def _prepared(settings, plan_name: str, dataset: str, console, **changes):
    """The quickstart plan `plan_name` with the settings' steps and splits (no overlays, `changes`
    applied), its synthetic data written and `dataset` (unc) prepared: (plan, workdir, shards,
    results folder, start time)."""
    from refbench.train import plans

    plan = plans.PLANS[plan_name]
    if settings.steps:
        plan = dataclasses.replace(plan, steps=settings.steps)
    plan = dataclasses.replace(plan, eval_splits=tuple(settings.splits or plan.eval_splits), vis=0, **changes)
    workdir = Path(settings.workdir)
    data, shards = workdir / "data", workdir / "shards"
    t0 = time.perf_counter()
    plans.synth_data(data, plan, console)
    prepare.main(dataset=dataset, split_by="unc", data=data, out=shards, shard_size=plan.shard_size)
    return plan, workdir, shards, workdir / "results", t0


def main(settings: SeedSettings, console: Console | None = None) -> dict:
    """Train and score every (model, seed), print the table, write seeds.md / seeds.json; returns the table."""
    from refbench import models
    from refbench.train import plans
    from refbench.train.config import parse_overrides

    console = console or Console(width=None if sys.stdout.isatty() else 160)  # the table's columns, also in a log file
    if settings.isa not in ISA_ENV:
        raise RefbenchError(f"--isa {settings.isa!r}: one of {', '.join(ISA_ENV)}")
    overrides = parse_overrides(settings.overrides)
    for m in settings.models:
        models.make_config(m, "tiny", **overrides)  # an unknown model or field, a bad value: one line, before any work
    if settings.task == "gres":
        return main_gres(settings, overrides, console)
    plan, workdir, shards, res, t0 = _prepared(settings, "full", "refcoco", console)
    cores = prepare.usable_cores()
    jobs = []
    for m in settings.models:
        tag = run_tag(m, overrides)
        for seed in settings.seeds:
            out = workdir / "runs" / settings.isa / tag / f"seed{seed}"
            cfg = plans.train_config(m, plan.steps, plan, shards, out, seed=seed, overrides=overrides)
            cfg = dataclasses.replace(cfg, quiet=True, recipe=dataclasses.replace(cfg.recipe, workers=0))
            score = dict(dataset=plan.dataset, splits=list(plan.eval_splits), shards=shards, results=res,
                         run_name=f"seeds-{tag}-{settings.isa}-seed{seed}", batch_size=64, workers=0)
            jobs.append(Job(f"{tag} seed {seed}", cfg, score))
    lanes = settings.lanes or max(1, cores)
    done = run_jobs(jobs, lanes=lanes, threads=1, console=console, cores=cores, env=ISA_ENV[settings.isa])
    table: dict = {"plan": {"steps": plan.steps, "batch_size": plan.batch_size, "dataset": plan.dataset,
                            "images": plan.images, "data_seed": plan.seed, "protocol": "original", "synthetic": True},
                   "isa": settings.isa, "overrides": overrides, "rows": []}
    for m in settings.models:
        tag = run_tag(m, overrides)
        for split in plan.eval_splits:
            per_seed = {}
            for seed in settings.seeds:
                result = done[f"{tag} seed {seed}"]
                (record,) = [e for e in result.records if e.split == split]
                per_seed[seed] = {**_figures(record.path), "capability": result.capability}
            table["rows"].append({"model": tag, "split": split, **summarize(per_seed)})
    table["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(table, console)
    write_table(table, workdir)
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def table_lines(table: dict) -> list[str]:
    """The table as markdown lines (seeds.md)."""
    plan = table["plan"]
    lines = [f"tiny models, {plan['steps']} steps, synthetic {plan['dataset']} (protocol {plan['protocol']}), "
             f"ISA {table['isa']}; mIoU in % over seeds: mean, sample sd, 95% bootstrap interval of the mean", "",
             "| model | split | seeds | mIoU mean | sd | 95% CI | per seed | on [SOS] (max) | mask corr (max) | "
             "mask sens. | kernel sens. (min) | CPU |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in table["rows"]:
        def fig(key: str, extreme: str | None = None) -> str:
            f = r.get(key)
            if f is None:
                return "-"
            return f"{f['mean']:.3f}" + (f" ({f[extreme]:.3f})" if extreme else "")
        per_seed = " / ".join(_pct(v) for v in r["mIoU"].values())
        lines.append(f"| {r['model']} | {r['split']} | {','.join(map(str, r['seeds']))} | {_pct(r['mean'])} | "
                     f"{100 * r['sd']:.2f} | [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}] | {per_seed} | "
                     f"{fig('sos_attention', 'max')} | {fig('query_mask_corr', 'max')} | {fig('mask_sensitivity')} | "
                     f"{fig('kernel_sensitivity', 'min')} | {','.join(r['capability'])} |")
    return lines


def print_table(table: dict, console: Console) -> None:
    plan = table["plan"]
    t = Table(title=f"refbench bench seeds: tiny models, {plan['steps']} steps, synthetic {plan['dataset']}, "
                    f"protocol {plan['protocol']}, ISA {table['isa']} (mIoU %, over seeds)", title_justify="left")
    for col in ("model", "split", "seeds", "mIoU mean", "sd", "95% CI of mean", "per seed", "on [SOS] mean (max)",
                "kernel sens. mean (min)", "mask sens.", "CPU"):
        t.add_column(col, justify="left" if col in ("model", "split", "seeds", "per seed", "CPU") else "right")
    for r in table["rows"]:
        sos, ks, ms = r.get("sos_attention"), r.get("kernel_sensitivity"), r.get("mask_sensitivity")
        t.add_row(r["model"], r["split"], str(len(r["seeds"])), _pct(r["mean"]), f"{100 * r['sd']:.2f}",
                  f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]", " / ".join(_pct(v) for v in r["mIoU"].values()),
                  f"{sos['mean']:.3f} ({sos['max']:.3f})" if sos else "-",
                  f"{ks['mean']:.3f} ({ks['min']:.3f})" if ks else "-", f"{ms['mean']:.3f}" if ms else "-",
                  ",".join(r["capability"]))
    console.print(t)
    console.print(f"time: {table['seconds']:.0f} s")


def write_table(table: dict, workdir: Path) -> None:
    """seeds.json and seeds.md (atomic), and one more line in seeds.jsonl (every table so far)."""
    workdir = Path(workdir)
    atomic_write_json(workdir / "seeds.json", table)
    atomic_write_text(workdir / "seeds.md", "\n".join(table_lines(table)) + "\n")
    history = workdir / "seeds.jsonl"
    old = history.read_text() if history.exists() else ""
    atomic_write_text(history, old + json.dumps(table) + "\n")



GRES_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc")  # the gRefCOCO table's metrics


def gres_variants(model: str, overrides: dict) -> list[dict]:
    """The runs of one model under `--task gres`: with and without its no-target head (a model
    with an `nt_head` field that `--set` leaves open), else the one configuration."""
    from refbench import models

    if "nt_head" in overrides or not hasattr(models.make_config(model, "tiny"), "nt_head"):
        return [dict(overrides)]
    return [{**overrides, "nt_head": True}, {**overrides, "nt_head": False}]


def main_gres(settings: SeedSettings, overrides: dict, console: Console) -> dict:
    """`refbench bench seeds MODEL... --task gres`: every (model, no-target rule, seed) trained on the
    quickstart's gRefCOCO plan, scored, and the table of gIoU / cIoU / N-acc / T-acc over seeds."""
    from refbench.train import plans

    # the runs carry their rule explicitly: the plan's own choice must not decide what is compared
    plan, workdir, shards, res, t0 = _prepared(settings, "gres", "grefcoco", console, model_overrides={})
    cores = prepare.usable_cores()
    jobs, tags = [], []
    for m in settings.models:
        for variant in gres_variants(m, overrides):
            tag = run_tag(m, variant)
            tags.append(tag)
            for seed in settings.seeds:
                out = workdir / "runs" / settings.isa / "gres" / tag / f"seed{seed}"
                cfg = plans.train_config(m, plan.steps, plan, shards, out, seed=seed, overrides=variant)
                cfg = dataclasses.replace(cfg, quiet=True, recipe=dataclasses.replace(cfg.recipe, workers=0))
                score = dict(dataset=plan.dataset, splits=list(plan.eval_splits), shards=shards, results=res,
                             run_name=f"seeds-gres-{tag}-{settings.isa}-seed{seed}", batch_size=64, workers=0)
                jobs.append(Job(f"{tag} seed {seed}", cfg, score))
    done = run_jobs(jobs, lanes=settings.lanes or max(1, cores), threads=1, console=console, cores=cores,
                    env=ISA_ENV[settings.isa])
    table: dict = {"task": "gres", "plan": {"steps": plan.steps, "batch_size": plan.batch_size, "dataset": plan.dataset,
                                            "images": plan.images, "data_seed": plan.seed, "protocol": "original",
                                            "synthetic": True}, "isa": settings.isa, "overrides": overrides, "rows": []}
    for tag in tags:
        for split in plan.eval_splits:
            row: dict = {"model": tag, "split": split, "seeds": list(settings.seeds)}
            per_seed = {}
            for seed in settings.seeds:
                (record,) = [e for e in done[f"{tag} seed {seed}"].records if e.split == split]
                per_seed[seed] = results.load_record(record.path).metrics
            for k in GRES_KEYS:
                vals = [per_seed[s][k] for s in settings.seeds if per_seed[s][k] is not None]
                row[k] = {"mean": statistics.fmean(vals) if vals else None,
                          "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "values": {str(s): per_seed[s][k] for s in settings.seeds}}
            table["rows"].append(row)
    table["seconds"] = round(time.perf_counter() - t0, 1)
    lines = gres_table_lines(table)
    console.print("\n".join(lines))
    atomic_write_json(workdir / "seeds-gres.json", table)
    atomic_write_text(workdir / "seeds-gres.md", "\n".join(lines) + "\n")
    return table


def gres_table_lines(table: dict) -> list[str]:
    """The gRefCOCO seed table as markdown lines: mean +- sample sd in % over seeds."""
    plan = table["plan"]
    lines = [f"refbench bench seeds --task gres: tiny models, {plan['steps']} steps, synthetic {plan['dataset']} "
             f"(gRefCOCO protocol {plan['protocol']}), ISA {table['isa']}; % over seeds {table['rows'][0]['seeds'] if table['rows'] else []}: "
             "mean +- sample sd", "",
             "| model (no-target rule) | split | " + " | ".join(GRES_KEYS) + " |", "|---|---|" + "---:|" * len(GRES_KEYS)]
    for r in table["rows"]:
        cells = ["n/a" if r[k]["mean"] is None else f"{100 * r[k]['mean']:.2f} +- {100 * r[k]['sd']:.2f}" for k in GRES_KEYS]
        lines.append(f"| {r['model']} | {r['split']} | " + " | ".join(cells) + " |")
    lines.append(f"time: {table['seconds']:.0f} s")
    return lines
