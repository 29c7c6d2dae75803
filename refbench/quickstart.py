"""`refbench quickstart`: the whole benchmark on the embedded synthetic dataset, offline, on CPU.

    synth          WORKDIR/data              the raw REFER-format synthetic dataset
    prepare --all  WORKDIR/shards            every dataset/partition pair as webdataset shards (RefCOCO, +, G-Ref x2, gRefCOCO)
    train          WORKDIR/runs/<model>      tiny eavl, cris, blind on synthetic refcoco_unc: same steps, side by side
    eval           WORKDIR/results           val, testA, testB of refcoco_unc (original protocol), each
                                             model as soon as it is trained
    leaderboard    WORKDIR/leaderboard.md    + leaderboard.html (measured rows beside the papers')
    pictures       WORKDIR/pictures          overlays of EAVL's best/worst/random testB sentences

Every stage is a call into the module that owns it (no logic of its own here), so the
quickstart exercises exactly what the individual commands run. Re-running it continues where it
stopped: finished runs are not retrained, a killed run resumes from its last.pt, and a run made
from other shards, another tiny config or another step count (an older refbench) is redone.

The plan is data (`QuickstartPlan`). Every model of a plan trains the same number of steps on
the same data, batch and seed (one `steps` field), so the leaderboard it writes compares like
with like. On two cores or more the models train side by side, one process each with an equal
share of the cores (`side_by_side`): a tiny step is hundreds of small kernels that a second
thread barely speeds up, so three one-thread runs at once get through about 1.3x the steps of
three two-thread runs one after another. A model is scored in a process of its own as soon as
it is trained, on the cores the runs still training leave free; while they train,
`refbench.train.sidebyside` prints one progress line per run (step, samples/s, ETA). `full`: 600
steps each, about 5 epochs of the 3,795 train refs. Measured (seed 0, 2 idle AVX-512 CPU cores,
`refbench quickstart`): testB mIoU EAVL 0.609, CRIS 0.630, blind 0.152, the whole run 437 s
(813 CPU-s). Over seeds 0-3 (`refbench bench seeds eavl cris blind`, docs/eavl-readings.md):
EAVL 0.603 +- 0.019, CRIS 0.630 +- 0.002, blind 0.168 +- 0.015. The language-blind control
stays under 0.35.
`check` (the default test suite's quality test) is the same data with fewer steps;
`fast` (`--fast`, also used by the tests) is a smaller dataset and a few steps, for checking
that every stage connects, not for quality.

`--task gres` (plans `gres`, `gres-fast` with `--fast`): the same side-by-side demo on the
synthetic gRefCOCO (`grefcoco_unc`: sentences with several or no targets): tiny EAVL, CRIS and
blind, every one deciding "no target" by the empty-mask rule (`plans.GRES_NT_HEAD`: it beat the
no-target head over seeds 0-3; blind's N-acc is the reference of a model that reads no
sentence), the same steps for all, each scored on val, testA, testB under the
gRefCOCO protocol original (gIoU, cIoU, N-acc, T-acc; refbench.eval.gres_eval), and the
leaderboard of grefcoco_unc written with its gRefCOCO columns beside ReLA's reported row. The
overlays are left out.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from refbench.data import prepare
from refbench.data.sources.refer import split_order
from refbench.eval import evaluate, results
from refbench.fsutil import atomic_write_json
from refbench.report import leaderboard
from refbench.train.plans import PLANS, QuickstartPlan, synth_data, train_config
from refbench.train.runs import ensure_trained
from refbench.train.sidebyside import Job, run_jobs, side_by_side


TASKS = ("ris", "gres")  # `refbench quickstart --task`: RefCOCO (the default) or gRefCOCO


def main(workdir: Path, fast: bool = False, plan: QuickstartPlan | None = None, task: str = "ris") -> dict:
    """Run every stage; returns a summary dict (paths and the headline numbers)."""
    if task not in TASKS:
        raise ValueError(f"quickstart task must be one of {', '.join(TASKS)}, not {task!r}")
    if plan is None:
        plan = PLANS[("gres-fast" if fast else "gres") if task == "gres" else ("fast" if fast else "full")]
    gres = plan.task == "gres"
    workdir = Path(workdir)
    console = Console()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str):
        console.rule(f"[bold]{name}")
        return _Timer(timings, name)

    data, shards, runs = workdir / "data", workdir / "shards", workdir / "runs"
    results, pictures = workdir / "results", workdir / "pictures"

    with stage("1/6 synth: the embedded synthetic dataset"):
        synth_data(data, plan, console)
    with stage("2/6 prepare: raw REFER files -> webdataset shards (every dataset/partition)"):
        prepare.main(all_=True, data=data, out=shards, shard_size=plan.shard_size)
    lanes, threads, workers = side_by_side(len(plan.models), prepare.usable_cores(), plan.workers)
    scored: dict[str, list] = {}
    if lanes > 1:
        with stage(f"3/6 train side by side: tiny {', '.join(plan.models)} on {plan.dataset}, {plan.steps} steps each, "
                   f"one process each ({threads} thread{'s' if threads > 1 else ''}), each scored once trained"):
            checkpoints, seconds, scored = _train_side_by_side(plan, shards, runs, threads, workers, console,
                                                               results=results, cores=prepare.usable_cores())
        timings.update({f"train {m}": seconds[m] for m in plan.models})
        timings.update({f"eval {m}": seconds[f"eval {m}"] for m in plan.models})
    else:
        checkpoints = {}
        for model in plan.models:
            with stage(f"3/6 train {model}: tiny, on {plan.dataset}, {plan.steps} steps"):
                checkpoints[model] = _train(model, plan.steps, plan, shards, runs / model, console)
    evaluated = []
    with stage(f"4/6 eval: {plan.dataset} {', '.join(plan.eval_splits)}, "
               f"{'gRefCOCO protocol original (gIoU, cIoU, N-acc, T-acc)' if gres else 'original protocol'}"):
        for model, ckpt in checkpoints.items():
            done = scored[model] if model in scored else _score(ckpt, model, plan, shards, results, plan.workers)
            evaluated += done
            evaluate.print_scores(done)
    with stage(f"5/6 leaderboard: measured records beside the papers' reported rows"
               f"{' (gRefCOCO columns: gIoU, cIoU, N-acc, T-acc, Pr@0.7-0.9)' if gres else ''}"):
        exports = {}
        for fmt in ("md", "html"):
            exports[fmt] = workdir / f"leaderboard.{fmt}"
            leaderboard.main(dataset=plan.dataset, fmt=fmt, out=exports[fmt], results=results, reported=None)
    if gres:  # no overlays: a no-target sentence has nothing to draw
        summary = _gres_summary(plan, workdir, checkpoints, evaluated, exports, timings, time.perf_counter() - t_start)
        _print_gres_summary(console, summary)
        return summary
    with stage("6/6 pictures: EAVL overlays"):
        pics = _collect_pictures(evaluated, pictures)

    summary = _summary(plan, workdir, checkpoints, evaluated, exports, pics, timings, time.perf_counter() - t_start)
    _print_summary(console, summary)
    return summary


class _Timer:
    def __init__(self, timings: dict, name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> "_Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timings[self.name.split(":")[0]] = round(time.perf_counter() - self.t0, 1)


def _train(model: str, steps: int, plan: QuickstartPlan, shards: Path, out: Path, console) -> Path:
    """Train one tiny model, or finish / reuse / redo an earlier quickstart's run (`train.ensure_trained`); returns best.pt."""
    state, best = ensure_trained(train_config(model, steps, plan, shards, out), say=console.print)
    if state.state == "done":
        console.print(f"{state.reason}: reused")
    return best


def _score_args(model: str, plan: QuickstartPlan, shards: Path, results: Path, workers: int) -> dict:
    """How a quickstart model is scored (evaluate.evaluate_checkpoint's keyword arguments): the
    plan's eval splits, EAVL with its overlays."""
    return dict(dataset=plan.dataset, splits=list(plan.eval_splits), shards=shards, results=results,
                run_name=f"quickstart-{model}", batch_size=64, workers=workers, vis=plan.vis if model == "eavl" else 0)


def _score(ckpt: Path, model: str, plan: QuickstartPlan, shards: Path, results: Path, workers: int) -> list:
    """Score one quickstart model on the plan's eval splits (EAVL with its overlays): its records."""
    return evaluate.evaluate_checkpoint(ckpt, **_score_args(model, plan, shards, results, workers))


def _train_side_by_side(plan: QuickstartPlan, shards: Path, runs: Path, threads: int, workers: int, console,
                        results: Path | None = None, cores: int = 1
                        ) -> tuple[dict[str, Path], dict[str, float], dict[str, list]]:
    """Train every model of the plan at once, one process each (refbench.train.sidebyside), with one
    live progress line per run; with `results`, each model is scored as soon as it is trained.
    Returns per model: best.pt, seconds (training, and "eval <model>" for the scoring) and records."""
    jobs = []
    for m in plan.models:
        cfg = train_config(m, plan.steps, plan, shards, runs / m)
        cfg = dataclasses.replace(cfg, quiet=True, recipe=dataclasses.replace(cfg.recipe, workers=workers))
        jobs.append(Job(m, cfg, _score_args(m, plan, shards, results, workers) if results is not None else None))
    done = run_jobs(jobs, lanes=len(jobs), threads=threads, console=console, cores=cores)
    seconds = {m: r.seconds for m, r in done.items()}
    seconds.update({f"eval {m}": r.eval_seconds for m, r in done.items() if r.eval_seconds is not None})
    scored = {m: r.records for m, r in done.items() if r.eval_seconds is not None}
    return {m: r.best for m, r in done.items()}, seconds, scored


def _collect_pictures(evaluated: list, folder: Path) -> list[Path]:
    """Copy the eval overlays into one folder the summary can point at."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for e in evaluated:
        for p in e.pictures:
            dst = folder / f"{e.model.name}-{e.split}-{p.name}"
            shutil.copyfile(p, dst)
            out.append(dst)
    return out


def _summary(plan, workdir, checkpoints, evaluated, exports, pictures, timings, seconds) -> dict:
    scores = {}
    for e in evaluated:
        record = results.load_record(e.path)
        m = record.metrics
        scores.setdefault(e.model.name, {})[e.split] = {"mIoU": m["mIoU"], "oIoU": m["oIoU"], "n": m["n"]}
        for extra in ("query_diversity", "sentence_sensitivity"):
            if extra in record.extras:
                scores[e.model.name][e.split][extra] = record.extras[extra]
    return {
        "workdir": str(workdir), "plan": dataclasses.asdict(plan), "seconds": round(seconds, 1),
        "timings": timings, "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "records": [str(e.path) for e in evaluated], "leaderboard": {k: str(v) for k, v in exports.items()},
        "pictures": [str(p) for p in pictures], "scores": scores, "dataset": plan.dataset, "protocol": "original",
    }


def _print_summary(console, s: dict) -> None:
    table = Table(title=f"quickstart: synthetic {s['dataset']}, tiny models, protocol {s['protocol']} "
                        f"(I/U at the original image size)", title_justify="left")
    table.add_column("model")
    splits = sorted({sp for per in s["scores"].values() for sp in per}, key=split_order)
    for sp in splits:
        table.add_column(f"{sp} mIoU %", justify="right")
        table.add_column(f"{sp} oIoU %", justify="right")
    for model, per in s["scores"].items():
        table.add_row(model, *[f"{100 * per[sp][m]:.2f}" if sp in per else "-" for sp in splits for m in ("mIoU", "oIoU")])
    console.rule("[bold]done")
    console.print(table)
    for model, per in s["scores"].items():
        for sp in splits:
            qd = per.get(sp, {}).get("query_diversity")
            if qd:
                console.print(f"query diversity of {model} on {sp} (mean over {qd['n']} sentences): mask correlation "
                              f"{qd['query_mask_corr']:.3f}, S_q entropy / log Nq {qd['query_weight_entropy']:.3f}, "
                              f"word attention spread {qd['word_attention_spread']:.3f}, on [SOS] {qd['sos_attention']:.3f}")
    for model, per in s["scores"].items():
        for sp in splits:
            ss = per.get(sp, {}).get("sentence_sensitivity")
            if ss:
                kernel = f", kernel {ss['kernel_sensitivity']:.3f}" if "kernel_sensitivity" in ss else ""
                console.print(f"sentence sensitivity of {model} on {sp} (mean over {ss['n']} sentences, each against "
                              f"one of another ref of its image): mask {ss['mask_sensitivity']:.3f}{kernel}")
    console.print(f"time: {s['seconds']:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in s['timings'].items())})")
    console.print(f"data:        {s['workdir']}/data (raw REFER format), {s['workdir']}/shards (webdataset)")
    for model, ckpt in s["checkpoints"].items():
        console.print(f"checkpoint:  {model}: {ckpt}")
    console.print(f"records:     {s['workdir']}/results ({len(s['records'])} result records + per-sentence parquet)")
    console.print(f"leaderboard: {s['leaderboard'].get('md')}  {s['leaderboard'].get('html')}")
    console.print(f"pictures:    {s['workdir']}/pictures ({len(s['pictures'])} PNG overlays)")
    atomic_write_json(Path(s["workdir"]) / "summary.json", s)
    console.print(f"summary:     {s['workdir']}/summary.json")


GRES_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc")  # the gRefCOCO summary's metrics (refbench.eval.gres_metrics)


def _gres_summary(plan, workdir, checkpoints, evaluated, exports, timings, seconds) -> dict:
    scores: dict = {}
    for e in evaluated:
        m = results.load_record(e.path).metrics
        scores.setdefault(e.model.name, {})[e.split] = {**{k: m[k] for k in GRES_KEYS}, "n": m["n"],
                                                        "n_no_target": m["n_no_target"],
                                                        "nt_head": bool(e.model.config.get("nt_head"))}
    return {
        "workdir": str(workdir), "plan": dataclasses.asdict(plan), "seconds": round(seconds, 1), "timings": timings,
        "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "records": [str(e.path) for e in evaluated],
        "scores": scores, "dataset": plan.dataset, "protocol": "original", "task": "gres",
        "leaderboard": {k: str(v) for k, v in exports.items()},
    }


def _print_gres_summary(console, s: dict) -> None:
    table = Table(title=f"quickstart --task gres: synthetic {s['dataset']}, tiny models, {s['plan']['steps']} steps each, "
                        f"gRefCOCO protocol {s['protocol']} (I/U at the original image size)", title_justify="left")
    table.add_column("model (no-target rule)")
    splits = sorted({sp for per in s["scores"].values() for sp in per}, key=split_order)
    for sp in splits:
        for k in GRES_KEYS:
            table.add_column(f"{sp} {k} %", justify="right")
    for model, per in s["scores"].items():
        rule = "nt_logit > 0" if any(v["nt_head"] for v in per.values()) else "empty mask"
        table.add_row(f"{model} ({rule})", *["n/a" if per.get(sp, {}).get(k) is None else f"{100 * per[sp][k]:.2f}"
                                             for sp in splits for k in GRES_KEYS])
    console.rule("[bold]done")
    console.print(table)
    console.print("blind reads no sentence: its N-acc is the chance reference for the no-target decision")
    console.print(f"time: {s['seconds']:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in s['timings'].items())})")
    for model, ckpt in s["checkpoints"].items():
        console.print(f"checkpoint:  {model}: {ckpt}")
    console.print(f"records:     {s['workdir']}/results ({len(s['records'])} gRefCOCO result records + per-sentence parquet)")
    console.print(f"leaderboard: {s['leaderboard'].get('md')}  {s['leaderboard'].get('html')}")
    atomic_write_json(Path(s["workdir"]) / "summary.json", s)
    console.print(f"summary:     {s['workdir']}/summary.json")
