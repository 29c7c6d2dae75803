"""`refbench ablate`: the shape of the EAVL paper's ablations (Tables 2-4) on synthetic RefCOCO+.

The paper ablates on RefCOCO+ testA with a CLIP ResNet-50 trained 50 epochs. This command runs
the same comparisons with the tiny backbone from random init on the synthetic RefCOCO+-style
split (`refcoco+_unc`: appearance-only sentences; testA = "round" scenes), and writes one
markdown report with our numbers beside the paper's, plus a plot of IoU against Nq:

    Table 2   Nq in {1, 4, 8, 16, 24, 32}, aligner dynamic, F_vg and MQE on
    Table 3   aligner dynamic vs fixed at Nq in {8, 16, 24} (fixed: no MQE, as in the paper)
    Table 4   F_vg x MQE on/off at Nq = 24

A configuration shared by several tables is trained once (Nq=24 dynamic with F_vg and MQE is
every table's full model, so the default plan is 12 runs, not 16). The steps, in order:

    data      refbench synth + refbench prepare (refcoco+ unc) into WORKDIR, unless there
    train     refbench.train.train per run, tiny recipe, --steps steps, into WORKDIR/runs/<run>/
    eval      refbench.eval.evaluate.evaluate_checkpoint on best.pt (chosen on val mIoU), split testA,
              protocol original: a normal result record under WORKDIR/results/
    compare   paired bootstrap of each row against its table's reference row (results.compare_records)
    report    WORKDIR/report.md (atomic) and WORKDIR/ablation-nq.png (atomic)

Resumable, by the run-state rule every command shares (refbench.train.run_state and
ensure_trained): a finished run is not retrained, a partly trained one continues from last.pt,
one made from something else (other shards, config, seed or recipe) is trained again; an
existing record of the run's current best.pt (same checkpoint sha256 and shard manifest) is
reused instead of scoring again. Run folders are named with their step budget
(`nq24-dynamic-s400`), so a different --steps starts new runs beside the old ones.

The module is the run; the plan (settings, table rows, runs) is refbench.ablate.plan and the
report (prose, tables, plot) refbench.ablate.report.

The rows and their comparisons are data (`table_rows`); the paper's numbers come from
leaderboard/reported/ablations/eavl.csv (refbench.report.leaderboard.load_ablations), joined on
(table, num_queries, aligner, global_feature, mqe).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from refbench import checkpoint
from refbench import progress as progress_mod
from refbench.ablate.plan import (
    DEFAULT_STEPS,
    AblationConfig,
    Row,
    Run,
    Setting,
    full_model,
    plan_runs,
    recipe,
    table_rows,
)
from refbench.ablate.report import (
    PLOT_NAME,
    REPORT_NAME,
    Outcome,
    Report,
    build_report,
    paper_row,
    plot_nq,
    print_summary,
    render_report,
)
from refbench.data import prepare
from refbench.data import shards as data
from refbench.data.synth import generate as synth
from refbench.errors import RefbenchError
from refbench.eval import evaluate, metrics, results
from refbench.fsutil import atomic_write_json, atomic_write_text, sha256_file
from refbench.report import leaderboard
from refbench.train.config import TrainConfig
from refbench.train.runs import ensure_trained

__all__ = ["DEFAULT_STEPS", "PLOT_NAME", "REPORT_NAME", "AblationConfig", "Outcome", "Report", "Row", "Run", "Setting",
           "build_report", "ensure_data", "execute_run", "find_record", "full_model", "main", "paper_row", "plan_runs",
           "plot_nq", "print_summary", "recipe", "render_report", "results_root", "run_ablation", "run_dir",
           "table_rows", "train_config"]


# ------------------------------------------------------------------------------ the command


def main(workdir: Path, steps: int | None) -> Path:
    """CLI entry (`refbench ablate --workdir --steps`): run the ablation, return the report path."""
    cfg = AblationConfig(workdir=Path(workdir), steps=steps or DEFAULT_STEPS)
    return run_ablation(cfg)


def run_ablation(cfg: AblationConfig, console=None) -> Path:
    """Data, training, scoring, comparisons, report and plot; resumable (module docstring)."""
    metrics.get_protocol(cfg.protocol)
    paper = leaderboard.load_ablations()  # fail early on a bad CSV, before any training
    console = console or progress_mod.console
    t0 = time.perf_counter()
    shards = ensure_data(cfg)
    rows = table_rows(cfg)
    runs = plan_runs(cfg, rows)
    outcomes: dict[Setting, Outcome] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("ablation", total=len(runs))
        for i, run in enumerate(runs, 1):
            tables = ", ".join(str(t) for t in run.tables)
            bar.update(task, description=f"ablation run {i}/{len(runs)}: {run.name} (Table {tables})")
            outcomes[run.setting] = execute_run(cfg, run, shards, say=bar.console.print)
            o = outcomes[run.setting]
            m = o.record.metrics
            bar.console.print(
                f"{run.name}: {cfg.dataset} {cfg.split} mIoU {100 * m['mIoU']:.2f}%, oIoU {100 * m['oIoU']:.2f}% "
                f"(protocol {cfg.protocol}, n={m['n']}; {'trained' if o.trained_now else 'reused run'}, "
                f"{'scored' if o.scored_now else 'reused record'})")
            bar.advance(task)
    report = build_report(cfg, rows, outcomes, paper, shards, seconds=time.perf_counter() - t0)
    report_path = cfg.workdir / REPORT_NAME
    plot_path = cfg.workdir / PLOT_NAME
    plot_nq(report, plot_path)
    atomic_write_text(report_path, render_report(report, plot_name=plot_path.name))
    print_summary(report, report_path, plot_path)
    return report_path


def ensure_data(cfg: AblationConfig) -> Path:
    """The shard root holding `cfg.dataset`: synth + prepare into WORKDIR unless already there."""
    if cfg.shards is not None:
        data.load_manifest(Path(cfg.shards) / cfg.dataset)  # one clear line if it is not prepared there
        return Path(cfg.shards)
    raw, shards = cfg.workdir / "data", cfg.workdir / "shards"
    dataset, _, split_by = cfg.dataset.rpartition("_")
    images = synth.DEFAULT_IMAGES if cfg.synth_images is None else cfg.synth_images
    made, want = synth.written_identity(raw), synth.identity(images, cfg.data_seed)
    if made is not None and made != want:
        config = ", another generator config" if made["config"] != want["config"] else ""
        raise RefbenchError(
            f"{raw} holds a synthetic dataset of {made['images']} images (seed {made['seed']}{config}); "
            f"this ablation uses {images} images (seed {cfg.data_seed}, today's generator defaults)",
            hint="choose another --workdir",
        )
    if (shards / cfg.dataset / "manifest.json").is_file():
        data.load_manifest(shards / cfg.dataset)
        return shards
    if not synth.is_complete(raw):
        synth.main(out=raw, images=images, seed=cfg.data_seed)
    prepare.main(dataset=dataset, split_by=split_by, data=raw, out=shards, workers=cfg.workers)
    return shards


def run_dir(cfg: AblationConfig, run: Run) -> Path:
    return cfg.workdir / "runs" / run.name


def results_root(cfg: AblationConfig) -> Path:
    return cfg.workdir / "results"


def train_config(cfg: AblationConfig, run: Run, shards: Path) -> TrainConfig:
    """The training run of one ablation setting."""
    return TrainConfig(model=cfg.model, variant=cfg.variant, dataset=cfg.dataset, shards=Path(shards),
                       recipe=recipe(cfg), out=run_dir(cfg, run), seed=cfg.seed,
                       model_overrides=run.setting.overrides())


def execute_run(cfg: AblationConfig, run: Run, shards: Path, say=print) -> Outcome:
    """Train `run` unless finished (`train.ensure_trained`), score its best.pt unless a record of it exists."""
    out = run_dir(cfg, run)
    timing_path = out / "ablate-timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"train_seconds": 0.0}
    t0 = time.perf_counter()
    state, best = ensure_trained(train_config(cfg, run, shards), say=say)
    trained_now = state.state != "done"
    if trained_now:
        if state.state != "resume":
            timing = {"train_seconds": 0.0}  # a new or redone run: earlier time does not count
        timing["train_seconds"] = timing.get("train_seconds", 0.0) + time.perf_counter() - t0
        atomic_write_json(timing_path, timing)

    ckpt = checkpoint.load(best)
    ckpt_sha = sha256_file(best)
    manifest_sha = sha256_file(Path(shards) / cfg.dataset / "manifest.json")
    record = find_record(cfg, run, ckpt_sha, manifest_sha)
    eval_seconds = None
    if record is None:
        t0 = time.perf_counter()
        (done,) = evaluate.evaluate_checkpoint(best, dataset=cfg.dataset, splits=[cfg.split], shards=shards,
                                               protocol=cfg.protocol, batch_size=cfg.eval_batch_size,
                                               workers=cfg.workers, results=results_root(cfg), run_name=run.name)
        eval_seconds = time.perf_counter() - t0
        record = results.load_record(done.path)
    val = (ckpt.get("metrics") or {}).get("mIoU")
    return Outcome(run=run, record=record, checkpoint_step=ckpt.get("step"), val_mIoU=val,
                   trained_now=trained_now, scored_now=eval_seconds is not None,
                   train_seconds=timing.get("train_seconds") or None, eval_seconds=eval_seconds)


def find_record(cfg: AblationConfig, run: Run, checkpoint_sha256: str, manifest_sha256: str):
    """The latest record of this run's checkpoint on the scored split and protocol, or None."""
    found = [
        rec for rec in results.iter_records(results_root(cfg) / cfg.dataset / cfg.split)
        if rec.model.get("run") == run.name and rec.model.get("checkpoint_sha256") == checkpoint_sha256
        and rec.protocol["name"] == cfg.protocol and rec.meta["data"].get("manifest_sha256") == manifest_sha256
    ]
    return max(found, key=lambda r: r.date) if found else None
