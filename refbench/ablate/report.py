"""The ablation report of `refbench ablate`: our numbers beside the paper's, in prose, tables and a plot.

`build_report` gathers each run's record, the paired bootstrap of every row against its
table's reference row (results.compare_records) and the facts of the setup; `render_report`
writes the markdown (setup, metric names, comparability, Tables 2-4, the shape of the result,
the runs), `plot_nq` the IoU-against-Nq figure, `print_summary` the terminal table.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from refbench import models
from refbench.ablate.plan import AblationConfig, Row, Run, Setting, full_model, recipe
from refbench.data import shards as data
from refbench.eval import metrics, results
from refbench.fsutil import atomic_write_bytes

REPORT_NAME = "report.md"
PLOT_NAME = "ablation-nq.png"
PAPER_SETUP = "EAVL (Yan et al. 2023), CLIP ResNet-50, 50 epochs, RefCOCO+ testA"


@dataclass
class Outcome:
    """What one run produced (or what an earlier invocation had produced)."""

    run: Run
    record: Any  # refbench.eval.results.Record of best.pt on the scored split
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


def build_report(cfg: AblationConfig, rows: list[Row], outcomes: dict[Setting, Outcome], paper, shards: Path,
                 seconds: float) -> Report:
    """Gather metrics, paired deltas (row vs its reference) and run facts for rendering."""
    deltas = {}
    for row in rows:
        key = (row.setting, row.reference)
        if row.setting != row.reference and key not in deltas:
            cmp = results.compare_records(outcomes[row.reference].record, outcomes[row.setting].record,
                                          samples=cfg.bootstrap_samples, seed=0)
            deltas[key] = cmp["mIoU"]
    manifest = data.load_manifest(Path(shards) / cfg.dataset)
    rec = recipe(cfg)
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
        "steps_per_epoch": data.steps_per_epoch(manifest, "train", rec.batch_size),
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


def paper_protocol(paper) -> str:
    """The protocol the paper's ablation rows were computed under (one for the whole file)."""
    return ", ".join(sorted(set(paper["protocol"].to_list())))


def paper_row(paper, table: int, s: Setting) -> dict | None:
    """The paper's row of `table` for setting `s` (values in percent), or None."""
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
    cfg, f = report.cfg, report.facts
    pr = metrics.PR_KEYS
    n_paper = 5726  # RefCOCO+ testA sentences (refer toolkit, UNC splits)
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
        f"- **Paper**: {PAPER_SETUP} ({n_paper} sentences), protocol `{paper_protocol(report.paper)}` (CRIS's "
        "evaluation code); leaderboard/reported/ablations/eavl.csv.",
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
    cfg = report.cfg
    fig = Figure(figsize=(11, 4))  # no pyplot: no global figure state, no GUI backend
    ax_p, ax_o = fig.subplots(1, 2)
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
    atomic_write_bytes(out, buf.getvalue())
    return out


def print_summary(report: Report, report_path: Path, plot_path: Path) -> None:
    """A rich table of our numbers per run, then where the report and the plot are."""
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
