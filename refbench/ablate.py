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
    eval      refbench.evaluate.main on best.pt (chosen on val mIoU), split testA, protocol
              original: a normal result record under WORKDIR/results/
    compare   paired bootstrap of each row against its table's reference row (results.compare_records)
    report    WORKDIR/report.md (atomic) and WORKDIR/ablation-nq.png (atomic)

Resumable: a run whose last.pt is at the final step is not retrained, a partly trained one
continues from last.pt (`--resume` semantics), and an existing record of the run's current
best.pt (same checkpoint sha256 and shard manifest) is reused instead of scoring again. Run
folders are named with their step budget (`nq24-dynamic-s400`), so a different --steps starts
new runs beside the old ones.

The rows and their comparisons are data (`table_rows`); the paper's numbers come from
leaderboard/reported/ablations/eavl.csv (refbench.leaderboard.load_ablations), joined on
(table, num_queries, aligner, global_feature, mqe).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from refbench.errors import RefbenchError

# Steps per run. Measured: `refbench ablate` with the defaults took 32.1 min on 2 idle cores
# (12 runs, ~2.7 min each: 400 tiny EAVL steps at ~0.3 s, 4 validations and the testA scoring).
# At 400 steps (~3.4 epochs of the synthetic train refs) the full model reaches 61% testA mIoU and
# every ablation's sign matches the paper's; val mIoU is still climbing: enough to learn, not to converge.
DEFAULT_STEPS = 400
REPORT_NAME = "report.md"
PLOT_NAME = "ablation-nq.png"
PAPER_SETUP = "EAVL (Yan et al. 2023), CLIP ResNet-50, 50 epochs, RefCOCO+ testA"


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
    recipe: str = "tiny"  # training recipe (refbench.recipes), --steps overrides its length
    dataset: str = "refcoco+_unc"  # prepared dataset trained and scored on
    split: str = "testA"  # scored split (the paper's: RefCOCO+ testA)
    protocol: str = "original"  # metric protocol of the records (refbench.metrics.PROTOCOLS)
    seed: int = 0  # training seed (model init and data stream), the same for every run
    data_seed: int = 0  # `refbench synth` seed
    synth_images: int | None = None  # synthetic images; None = refbench.synth.DEFAULT_IMAGES
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


@dataclass
class Outcome:
    """What one run produced (or what an earlier invocation had produced)."""

    run: Run
    record: Any  # refbench.results.Record of best.pt on the scored split
    checkpoint_step: int | None  # the step best.pt was saved at
    val_mIoU: float | None  # best.pt's validation mIoU (fraction), as training selected it
    trained_now: bool  # trained (fully or partly) in this invocation
    scored_now: bool  # scored in this invocation
    train_seconds: float | None  # wall time of training, summed over invocations (None: unknown)
    eval_seconds: float | None  # wall time of scoring (None: reused record)


@dataclass
class Report:
    """Everything the markdown report shows; built from records, rendered by `render_report`."""

    cfg: AblationConfig
    rows: list[Row]
    metrics: dict[Setting, dict]  # the record's metrics (n, mIoU, oIoU, Pr@X, ci95: fractions)
    deltas: dict[tuple[Setting, Setting], dict]  # (setting, reference) -> paired bootstrap of mIoU (fractions)
    paper: Any  # polars DataFrame of load_ablations()
    runs: list[dict] = field(default_factory=list)  # one dict per run for the Runs table
    facts: dict = field(default_factory=dict)  # synth images, sentences, epochs, date, commit, wall time


# ------------------------------------------------------------------------------ planning


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


# ------------------------------------------------------------------------------ the command


def main(workdir: Path, steps: int | None) -> Path:
    """CLI entry (`refbench ablate --workdir --steps`): run the ablation, return the report path."""
    cfg = AblationConfig(workdir=Path(workdir), steps=steps or DEFAULT_STEPS)
    return run_ablation(cfg)


def run_ablation(cfg: AblationConfig, console=None) -> Path:
    """Data, training, scoring, comparisons, report and plot; resumable (module docstring)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from refbench import fsutil, leaderboard, metrics
    from refbench import progress as progress_mod

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
            outcomes[run.setting] = execute_run(cfg, run, shards)
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
    fsutil.atomic_write_text(report_path, render_report(report, plot_name=plot_path.name))
    print_summary(report, report_path, plot_path)
    return report_path


def ensure_data(cfg: AblationConfig) -> Path:
    """The shard root holding `cfg.dataset`: synth + prepare into WORKDIR unless already there."""
    from refbench import prepare, synth
    from refbench.prepare import load_manifest

    if cfg.shards is not None:
        load_manifest(cfg.shards, cfg.dataset)  # one clear line if it is not prepared there
        return Path(cfg.shards)
    data, shards = cfg.workdir / "data", cfg.workdir / "shards"
    dataset, _, split_by = cfg.dataset.rpartition("_")
    images = synth.DEFAULT_IMAGES if cfg.synth_images is None else cfg.synth_images
    made, want = synth.written_identity(data), synth.identity(images, cfg.data_seed)
    if made is not None and made != want:
        config = ", another generator config" if made["config"] != want["config"] else ""
        raise RefbenchError(
            f"{data} holds a synthetic dataset of {made['images']} images (seed {made['seed']}{config}); "
            f"this ablation uses {images} images (seed {cfg.data_seed}, today's generator defaults)",
            hint="choose another --workdir",
        )
    if (shards / cfg.dataset / "manifest.json").is_file():
        load_manifest(shards, cfg.dataset)
        return shards
    if not synth.is_complete(data):
        synth.main(out=data, images=images, seed=cfg.data_seed)
    prepare.main(dataset=dataset, split_by=split_by, data=data, out=shards, workers=cfg.workers)
    return shards


def _recipe(cfg: AblationConfig):
    from refbench.recipes import get_recipe

    return get_recipe(cfg.recipe, steps=cfg.steps, batch_size=cfg.batch_size, workers=cfg.workers)


def run_dir(cfg: AblationConfig, run: Run) -> Path:
    return cfg.workdir / "runs" / run.name


def results_root(cfg: AblationConfig) -> Path:
    return cfg.workdir / "results"


def training_state(cfg: AblationConfig, run: Run) -> str:
    """"new", "partial" (last.pt before the final step) or "done"; refuses a foreign run folder."""
    from refbench import checkpoint

    out = run_dir(cfg, run)
    config_path = out / "config.json"
    if config_path.is_file():
        have = json.loads(config_path.read_text())
        want = {"model": cfg.model, "variant": cfg.variant, "dataset": cfg.dataset, "seed": cfg.seed,
                "overrides": run.setting.overrides(), "total_steps": cfg.steps,
                "batch_size": _recipe(cfg).batch_size}
        got = {**{k: have.get(k) for k in want}, "batch_size": have.get("recipe", {}).get("batch_size")}
        diff = [k for k in want if got[k] != want[k]]
        if diff:
            raise RefbenchError(
                f"{out}: holds a run with other settings ({', '.join(f'{k} {got[k]!r} != {want[k]!r}' for k in diff)})",
                hint="choose another --workdir, or delete that run folder",
            )
    last = out / "last.pt"
    if not last.is_file():
        return "new"
    step = checkpoint.load(last)["step"]
    if step >= cfg.steps:
        if not (out / "best.pt").is_file():
            raise RefbenchError(f"{out}: training finished (last.pt at step {step}) but best.pt is missing",
                                hint="delete the run folder to retrain it")
        return "done"
    return "partial"


def execute_run(cfg: AblationConfig, run: Run, shards: Path) -> Outcome:
    """Train `run` unless finished, score its best.pt unless a record of it exists."""
    from refbench import checkpoint, evaluate, fsutil, results, train

    out = run_dir(cfg, run)
    timing_path = out / "ablate-timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"train_seconds": 0.0}
    state = training_state(cfg, run)
    trained_now = state != "done"
    if trained_now:
        t0 = time.perf_counter()
        train.train(train.TrainConfig(
            model=cfg.model, variant=cfg.variant, dataset=cfg.dataset, shards=shards, recipe=_recipe(cfg),
            out=out, resume=state == "partial", seed=cfg.seed, model_overrides=run.setting.overrides(),
        ))
        timing["train_seconds"] = timing.get("train_seconds", 0.0) + time.perf_counter() - t0
        fsutil.atomic_write_json(timing_path, timing)

    best = out / "best.pt"
    ckpt = checkpoint.load(best)
    ckpt_sha = fsutil.sha256_file(best)
    manifest_sha = fsutil.sha256_file(shards / cfg.dataset / "manifest.json")
    record = find_record(cfg, run, ckpt_sha, manifest_sha)
    eval_seconds = None
    if record is None:
        t0 = time.perf_counter()
        # evaluate.main prints a full table per record; here one line per run says it (run_ablation)
        with contextlib.redirect_stdout(io.StringIO()):
            paths = evaluate.main(checkpoint=best, dataset=cfg.dataset, split=cfg.split, shards=shards,
                                  protocol=cfg.protocol, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                                  vis=0, results=results_root(cfg), run_name=run.name)
        eval_seconds = time.perf_counter() - t0
        record = results.load_record(paths[0])
    val = (ckpt.get("metrics") or {}).get("mIoU")
    return Outcome(run=run, record=record, checkpoint_step=ckpt.get("step"), val_mIoU=val,
                   trained_now=trained_now, scored_now=eval_seconds is not None,
                   train_seconds=timing.get("train_seconds") or None, eval_seconds=eval_seconds)


def find_record(cfg: AblationConfig, run: Run, checkpoint_sha256: str, manifest_sha256: str):
    """The latest record of this run's checkpoint on the scored split and protocol, or None."""
    from refbench import results

    found = [
        rec for rec in results.iter_records(results_root(cfg) / cfg.dataset / cfg.split)
        if rec.model.get("run") == run.name and rec.model.get("checkpoint_sha256") == checkpoint_sha256
        and rec.protocol["name"] == cfg.protocol and rec.meta["data"].get("manifest_sha256") == manifest_sha256
    ]
    return max(found, key=lambda r: r.date) if found else None


# ------------------------------------------------------------------------------ the report


def build_report(cfg: AblationConfig, rows: list[Row], outcomes: dict[Setting, Outcome], paper, shards: Path,
                 seconds: float) -> Report:
    """Gather metrics, paired deltas (row vs its reference) and run facts for rendering."""
    import math

    from refbench import results
    from refbench.prepare import load_manifest

    deltas = {}
    for row in rows:
        key = (row.setting, row.reference)
        if row.setting != row.reference and key not in deltas:
            cmp = results.compare_records(outcomes[row.reference].record, outcomes[row.setting].record,
                                          samples=cfg.bootstrap_samples, seed=0)
            deltas[key] = cmp["mIoU"]
    manifest = load_manifest(shards, cfg.dataset)
    rec = _recipe(cfg)
    train_refs = manifest["splits"]["train"]["refs"]
    any_record = next(iter(outcomes.values())).record
    runs = [{
        "run": o.run.name, "tables": o.run.tables, "key": o.run.setting, "setting": o.run.setting.label,
        "checkpoint_step": o.checkpoint_step, "val_mIoU": o.val_mIoU, "record": _relative(o.record.path, cfg.workdir),
        "train_seconds": o.train_seconds, "eval_seconds": o.eval_seconds,
    } for o in outcomes.values()]
    facts = {
        "images": {s: c["images"] for s, c in manifest["splits"].items()},
        "train_refs": train_refs,
        "sentences": any_record.metrics["n"],
        "batch_size": rec.batch_size,
        "epochs": cfg.steps * rec.batch_size / train_refs,
        "steps_per_epoch": math.ceil(train_refs / rec.batch_size),
        "lr": rec.lr,
        "threshold": any_record.protocol["threshold"],
        "protocol_version": any_record.protocol["version"],
        "git_commit": any_record.meta["provenance"].get("git_commit"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": seconds,
    }
    return Report(cfg=cfg, rows=rows, metrics={s: o.record.metrics for s, o in outcomes.items()},
                  deltas=deltas, paper=paper, runs=runs, facts=facts)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


TABLE_TITLES = {
    2: "Table 2: number of queries Nq (dynamic aligner, F_vg and MQE on)",
    3: "Table 3: Vision-Language Aligner (dynamic kernels) vs a fixed-kernel convolution",
    4: "Table 4: global vision feature F_vg and Multi-Query Estimator (MQE), Nq = {nq}",
}
DASH = "-"  # an empty cell: not run by us / not in the paper


def paper_row(paper, table: int, s: Setting) -> dict | None:
    """The paper's row of `table` for setting `s` (values in percent), or None."""
    import polars as pl

    hit = paper.filter(
        (pl.col("table") == table) & (pl.col("num_queries") == s.num_queries) & (pl.col("aligner") == s.aligner)
        & (pl.col("global_feature") == s.global_vision) & (pl.col("mqe") == s.estimator)
    )
    return hit.row(0, named=True) if hit.height else None


def _table_settings(report: Report, table: int) -> list[tuple[Setting, Setting]]:
    """(setting, reference) of every row of `table`: ours, plus paper-only rows (e.g. Nq=2)."""
    ours = [(r.setting, r.reference) for r in report.rows if r.table == table]
    if table == 2:
        reference = ours[0][1] if ours else full_model(report.cfg)
        have = {s.num_queries for s, _ in ours}
        for nq in report.paper.filter(report.paper["table"] == 2)["num_queries"].to_list():
            if nq not in have:
                ours.append((Setting(nq, "dynamic", True, True), reference))
        ours.sort(key=lambda sr: sr[0].num_queries)
    return ours


def _pct(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{100 * x:.{digits}f}"


def _signed(x: float | None) -> str:
    return DASH if x is None else f"{x:+.2f}"


def _setting_cell(table: int, s: Setting) -> str:
    if table == 2:
        return f"Nq={s.num_queries}"
    if table == 3:
        return f"Nq={s.num_queries}, {'Aligner' if s.aligner == 'dynamic' else 'Fixed'}"
    return f"F_vg {'on' if s.global_vision else 'off'}, MQE {'on' if s.estimator else 'off'}"


def render_report(report: Report, plot_name: str = PLOT_NAME) -> str:
    """The markdown report: setup, metric names, comparability, Tables 2-4, shape summary, runs."""
    from refbench import models
    from refbench import metrics

    cfg, f = report.cfg, report.facts
    pr = metrics.PR_KEYS
    n_paper = 5726  # RefCOCO+ testA sentences (refcoco-facts.md)
    side = models.make_config(cfg.model, cfg.variant).image_size  # the backbone's input, pixels
    lines = [
        f"# EAVL ablations (paper Tables 2-4) on synthetic RefCOCO+: refbench `{cfg.model}/{cfg.variant}` beside the paper",
        "",
        f"- **Ours**: `{cfg.model}/{cfg.variant}` from random init, recipe `{cfg.recipe}`, {cfg.steps} steps at global "
        f"batch {f['batch_size']} (~{f['epochs']:.1f} epochs of the {f['train_refs']} synthetic train refs), peak lr "
        f"{f['lr']:g}, seed {cfg.seed}, one run per configuration. Trained on synthetic `{cfg.dataset}` train "
        f"(`refbench synth`, seed {cfg.data_seed}), best.pt chosen on synthetic val mIoU, scored on **synthetic "
        f"`{cfg.dataset}` {cfg.split}** ({f['sentences']} sentences) under protocol `{cfg.protocol}` "
        f"v{f['protocol_version']} (threshold {f['threshold']:g}).",
        f"- **Paper**: {PAPER_SETUP} ({n_paper} sentences); "
        "leaderboard/reported/ablations/eavl.csv.",
        f"- Generated {f['date']} by `refbench ablate` (git commit {f['git_commit'] or 'unknown'}), "
        f"wall time of this invocation {f['wall_seconds'] / 60:.1f} min.",
        "",
        "## Metrics, named",
        "",
        "- Paper **\"IoU\"** is **mIoU**: the mean over sentences of per-sentence IoU at the original image size, "
        "sigmoid > 0.35 (CRIS's evaluation code, which EAVL uses). The paper's Pr@X counts IoU > X (strict). The "
        "paper reports no overall IoU.",
        "- Ours: **mIoU** (the same definition, with its 95% bootstrap interval over sentences), **oIoU** = sum I / "
        "sum U over sentences, and **Pr@X** = share of sentences with IoU >= X (it differs from the strict count only "
        "on exact ties). An empty union counts as IoU 0.",
        "- **Delta** columns: mIoU of the row minus mIoU of its table's reference row (Table 2 and 4: the full model, "
        f"Nq={cfg.default_queries} with F_vg and MQE; Table 3: the dynamic aligner at the same Nq), percentage points. "
        f"Ours comes with a 95% paired-bootstrap interval over the same sentences ({cfg.bootstrap_samples} resamples).",
        "- All values are percent.",
        "",
        "## What is and is not comparable",
        "",
        "- **Not comparable: the absolute numbers.** Our data are synthetic flat-coloured shapes with template "
        "sentences in RefCOCO+ style (appearance words only: colour, shape, size; no location words), not COCO photos "
        "with human expressions; our testA is the synthetic analogue of RefCOCO+ testA (\"round\" scenes, as testA "
        f"holds people), {f['sentences']} sentences against {n_paper}. Our backbone is the `{cfg.variant}` CLIP-style "
        f"backbone at {side}x{side} from random init, not CLIP ResNet-50 pretrained at 480x480; we train {cfg.steps} steps "
        f"(~{f['epochs']:.1f} epochs of a small train split), not 50 epochs of 120k sentences.",
        "- **Comparable, roughly: the shape.** Within one table, every row of ours shares data, recipe, steps and "
        "seed, so the sign and rough size of a delta is what can be set beside the paper's delta.",
        "- **Noise.** One training run per configuration: our intervals cover the sampling of test sentences, not "
        "run-to-run variance from the seed, which after few steps on CPU can be as large as the paper's 0.5-3 "
        "point effects. A delta whose interval spans 0 says \"no difference measured\", not \"same\".",
        "- **Metric details** agree (mIoU at the original size, threshold 0.35); Pr@X differs only on exact ties. "
        "Checkpoint choice: ours is the best validation mIoU; the paper does not say which epoch it reports.",
        "",
    ]
    for table in (2, 3, 4):
        lines += _render_table(report, table, pr)
        if table == 2:
            lines += [f"![IoU against Nq: the paper's Table 2 (left) and ours (right)]({plot_name})", ""]
    lines += _render_shape(report)
    lines += _render_runs(report)
    return "\n".join(lines).rstrip() + "\n"


def _render_table(report: Report, table: int, pr: tuple[str, ...]) -> list[str]:
    cfg = report.cfg
    title = TABLE_TITLES[table].format(nq=cfg.default_queries)
    head = ["setting", "source", "mIoU % [95% CI]", "oIoU %", *[f"{k} %" for k in pr], "delta mIoU (pp) [95% CI]"]
    out = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for s, ref in _table_settings(report, table):
        p, p_ref = paper_row(report.paper, table, s), paper_row(report.paper, table, ref)
        m = report.metrics.get(s)
        is_ref = s == ref
        # the paper's row
        if p is None:
            paper_cells = [DASH] * (2 + len(pr)) + [DASH]
        else:
            p_delta = "0 (reference)" if is_ref else (_signed(p["mIoU"] - p_ref["mIoU"]) if p_ref else DASH)
            paper_cells = [f"{p['mIoU']:.2f}", "not reported", *[f"{p[k]:.2f}" for k in pr], p_delta]
        # our row
        if m is None:
            our_cells = ["not run"] + [DASH] * (1 + len(pr)) + [DASH]
        else:
            lo, hi = m["ci95"]["mIoU"]
            d = report.deltas.get((s, ref))
            if is_ref:
                our_delta = "0 (reference)"
            elif d is None:
                our_delta = DASH
            else:
                our_delta = f"{100 * d['diff']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]"
            our_cells = [f"{_pct(m['mIoU'])} [{_pct(lo, 1)}, {_pct(hi, 1)}]", _pct(m["oIoU"]),
                         *[_pct(m[k]) for k in pr], our_delta]
        label = _setting_cell(table, s)
        out.append("| " + " | ".join([label, "paper"] + paper_cells) + " |")
        out.append("| " + " | ".join([label, "ours"] + our_cells) + " |")
    return out + [""]


def _reading(paper_delta: float | None, ours: dict | None) -> str:
    if paper_delta is None or ours is None:
        return DASH
    lo, hi = ours["ci"]
    if lo <= 0 <= hi:
        return "ours: no difference measured (interval spans 0)"
    same = (ours["diff"] > 0) == (paper_delta > 0)
    return "same direction as the paper" if same else "opposite direction to the paper"


def _render_shape(report: Report) -> list[str]:
    out = [
        "## Shape: do our deltas move the way the paper's do?",
        "",
        "| table | row vs reference | paper delta IoU (pp) | ours delta mIoU (pp) [95% paired CI] | reading |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows:
        if row.setting == row.reference:
            continue
        p, p_ref = paper_row(report.paper, row.table, row.setting), paper_row(report.paper, row.table, row.reference)
        p_delta = p["mIoU"] - p_ref["mIoU"] if p and p_ref else None
        d = report.deltas.get((row.setting, row.reference))
        ours = DASH if d is None else f"{100 * d['diff']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]"
        out.append(f"| {row.table} | {row.setting.label} vs {row.reference.label} | {_signed(p_delta)} | {ours} | "
                   f"{_reading(p_delta, d)} |")
    return out + [""]


def _render_runs(report: Report) -> list[str]:
    out = [
        "## Runs",
        "",
        f"Run folders under `{report.cfg.workdir}/runs/`; record paths are relative to `{report.cfg.workdir}`. "
        "Times are wall-clock on the machine that ran them (train: summed over invocations; eval: "
        "blank when an earlier record was reused).",
        "",
        "| run | tables | configuration | best.pt step | val mIoU % | train s | eval s | record |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        def secs(x):
            return DASH if x is None else f"{x:.0f}"
        out.append(f"| {r['run']} | {', '.join(map(str, r['tables']))} | {r['setting']} | "
                   f"{DASH if r['checkpoint_step'] is None else r['checkpoint_step']} | {_pct(r['val_mIoU'])} | "
                   f"{secs(r['train_seconds'])} | {secs(r['eval_seconds'])} | `{r['record']}` |")
    train_s = sum(r["train_seconds"] or 0.0 for r in report.runs)
    eval_s = sum(r["eval_seconds"] or 0.0 for r in report.runs)
    out += ["", f"Training, all runs: {train_s / 60:.1f} min; scoring in this invocation: {eval_s / 60:.1f} min; "
                f"this invocation in all: {report.facts['wall_seconds'] / 60:.1f} min."]
    return out + [""]


def plot_nq(report: Report, out: Path) -> Path:
    """Two panels, IoU against Nq: the paper's Table 2 (and 3) left, ours right (atomic PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from refbench.fsutil import atomic_write_bytes

    cfg = report.cfg
    fig, (ax_p, ax_o) = plt.subplots(1, 2, figsize=(11, 4))
    t2 = report.paper.filter(pl.col("table") == 2).sort("num_queries")
    ax_p.plot(t2["num_queries"], t2["mIoU"], "o-", label="dynamic aligner (Table 2)")
    t3 = report.paper.filter((pl.col("table") == 3) & (pl.col("aligner") == "fixed")).sort("num_queries")
    if t3.height:
        ax_p.plot(t3["num_queries"], t3["mIoU"], "s--", label="fixed kernel (Table 3)")
    ax_p.set(title=f"paper: {PAPER_SETUP}", ylabel='"IoU" = mIoU (%)')

    dyn = sorted((s, m) for s, m in report.metrics.items()
                 if s.aligner == "dynamic" and s.global_vision and s.estimator)
    if dyn:
        x = [s.num_queries for s, _ in dyn]
        y = [100 * m["mIoU"] for _, m in dyn]
        err = [[100 * (m["mIoU"] - m["ci95"]["mIoU"][0]) for _, m in dyn],
               [100 * (m["ci95"]["mIoU"][1] - m["mIoU"]) for _, m in dyn]]
        ax_o.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label="mIoU, dynamic aligner (95% CI)")
        ax_o.plot(x, [100 * m["oIoU"] for _, m in dyn], "^:", label="oIoU, dynamic aligner")
    fixed = sorted((s, m) for s, m in report.metrics.items() if s.aligner == "fixed" and s.global_vision)
    if fixed:
        ax_o.plot([s.num_queries for s, _ in fixed], [100 * m["mIoU"] for _, m in fixed], "s--",
                  label="mIoU, fixed kernel")
    ax_o.set(title=f"ours: {cfg.model}/{cfg.variant}, {cfg.steps} steps, synthetic {cfg.dataset} {cfg.split}",
             ylabel=f"mIoU / oIoU (%, protocol {cfg.protocol})")
    for ax in (ax_p, ax_o):
        ax.set_xscale("log", base=2)
        ticks = sorted(set(t2["num_queries"].to_list()) | {s.num_queries for s in report.metrics})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("number of queries Nq (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_p, ax_o):
        ax.title.set_fontsize(9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def print_summary(report: Report, report_path: Path, plot_path: Path) -> None:
    """A rich table of our numbers per run, then where the report and the plot are."""
    from rich.console import Console
    from rich.table import Table

    cfg = report.cfg
    table = Table(title=f"refbench ablate: {cfg.model}/{cfg.variant}, {cfg.steps} steps, synthetic {cfg.dataset} "
                        f"{cfg.split}, protocol {cfg.protocol} (values in %)", title_justify="left")
    for col in ("run", "tables", "mIoU %", "oIoU %", "Pr@0.5 %", "Pr@0.9 %", "n"):
        table.add_column(col, justify="left" if col in ("run", "tables") else "right")
    for r in report.runs:
        m = report.metrics[r["key"]]
        table.add_row(r["run"], ", ".join(map(str, r["tables"])), _pct(m["mIoU"]), _pct(m["oIoU"]),
                      _pct(m["Pr@0.5"]), _pct(m["Pr@0.9"]), str(m["n"]))
    console = Console()
    console.print(table)
    console.print(f"report (ours beside the paper's Tables 2-4): {report_path}\nplot (IoU against Nq): {plot_path}\n"
                  f"wall time {report.facts['wall_seconds'] / 60:.1f} min")

