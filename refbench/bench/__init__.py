"""`refbench bench`: refbench measured against its baselines, side by side in one run.

    refbench bench [prepare|loader|shards|model|step|eval|score|gpu|all] --workdir bench --images 2000 --log bench/bench.jsonl [--out DIR]

The package keeps the measuring apart from the product code:

    common.py     BenchSettings (every knob, defaults = the command's), result rows, paired
                  interleaved timing, the synthetic data sets (written by `refbench.data.synth` into
                  the workdir and reused while their SYNTH.json matches)
    baselines.py  what the baselines do: the read-and-tar floor of prepare, the refer-style
                  loader, the PNG-mask byte count; nothing in refbench's data path imports it
    runs.py       one `bench_x(settings) -> rows` per benchmark, registered in `BENCHES` here
    step.py       where a tiny training step goes (eavl, cris, blind at the quickstart's batch
                  and input size): data wait, forward and backward by model part (CLIP image and
                  text towers, neck, query generator, decoder, aligner / head), loss, clipping,
                  optimiser step, from torch.profiler; ms per step and share of the step
    score.py      `refbench score` vs merely decoding the submitted masks, on a synthetic RefCOCO
                  testB-sized submission of COCO-size masks
    gpu.py        EAVL and CRIS rn101 at 480 in bf16 on one GPU: training samples/s and peak
                  memory per batch, channels_last vs NCHW, data-wait share per loader worker
                  count, eval sentences/s; one line and no rows without a GPU

`main` runs the chosen benchmarks, prints one rich table and appends one JSON line per run
(time, git commit, cores, load average, torch threads, rows) to the log file, atomically;
with `out`, also writes the rows as out/bench.json and out/bench.md.

Data. The data benchmarks run on synthetic REFER sets, `settings.images` images each, in two
configurations (`BenchSettings.sets`): "coco-like" (640 x 427..480 px, noise tuned so JPEGs
average ~160 KB, like COCO train2014: the representative one, which carries the targets) and
"default" (the embedded quickstart data: ~250 x 200 px, ~15 KB JPEGs, reported for information).
refcoco/unc is the partition measured.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from refbench.bench.common import BenchSettings, cores
from refbench.bench.gpu import bench_gpu
from refbench.bench.runs import bench_eval, bench_loader, bench_model, bench_prepare, bench_shards
from refbench.bench.score import bench_score
from refbench.bench.step import bench_step
from refbench.errors import RefbenchError
from refbench.eval.results import git_commit
from refbench.fsutil import atomic_write_text

BENCHES: dict[str, Callable[[BenchSettings], list[dict]]] = {  # name -> benchmark; `refbench bench NAME`
    "prepare": bench_prepare,
    "loader": bench_loader,
    "shards": bench_shards,
    "model": bench_model,
    "step": bench_step,
    "eval": bench_eval,
    "score": bench_score,
    "gpu": bench_gpu,
}


def _append_jsonl(log: Path, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten atomically (temp + rename)."""
    old = log.read_text() if log.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(log, old + json.dumps(record) + "\n")


def print_rows(rows: list[dict], caption: str | None = None) -> None:
    """The results as one rich table; each row says what was measured and what the baseline does."""
    table = Table(title="refbench bench (ratio = ours / baseline)", caption=caption, show_lines=True)
    for col in ("bench", "what (unit, data, setting) / [dim]baseline[/]", "ours", "baseline", "ratio", "target", "ok"):
        table.add_column(col, justify="right" if col in ("ours", "baseline", "ratio") else "left")
    for r in rows:
        ok = "-" if r["ok"] is None else ("[green]yes[/]" if r["ok"] else "[red]NO[/]")
        what = r["what"] + (f"\n[dim]baseline: {r['baseline_is']}[/]" if r.get("baseline_is") else "")
        table.add_row(r["bench"], what, f"{r['ours']:.4g}", f"{r['baseline']:.4g}", f"{r['ratio']:.3f}", r["target"] or "-", ok)
    Console(width=None if sys.stdout.isatty() else 150).print(table)


def write_tables(rows: list[dict], out: Path, caption: str) -> tuple[Path, Path]:
    """The rows as out/bench.json (with the caption) and out/bench.md (one markdown table), atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{caption}", "", "| bench | what | ours | baseline | ratio | target | ok |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        what = r["what"] + (f" (baseline: {r['baseline_is']})" if r.get("baseline_is") else "")
        lines.append(f"| {r['bench']} | {what} | {r['ours']:.4g} | {r['baseline']:.4g} | {r['ratio']:.3f} | {r['target'] or '-'} | {ok} |")
    json_path, md_path = out / "bench.json", out / "bench.md"
    atomic_write_text(json_path, json.dumps({"caption": caption, "rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def main(which, settings: BenchSettings = BenchSettings(), out: Path | None = None) -> list[dict]:
    """Run the benchmarks named in `which` ("all" = every registered one), print, log (and write to `out`)."""
    names = list(BENCHES) if "all" in which else list(dict.fromkeys(which))
    missing = [n for n in names if n not in BENCHES]
    if missing:
        raise RefbenchError(
            f"unknown benchmark(s) {', '.join(missing)}: not implemented",
            hint=f"available: {', '.join(BENCHES)}",
        )
    Path(settings.workdir).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for name in names:
        rows.extend(BENCHES[name](settings))
    load = [round(x, 2) for x in os.getloadavg()]
    caption = (f"{platform.machine()}, {cores()} cores, torch {torch.__version__}, load average {load_before[0]:.2f} before / "
               f"{load[0]:.2f} after (1 min): other processes share the cores; ratios pair back-to-back runs")
    if not rows:  # e.g. `bench gpu` without a GPU: it said so in one line
        return rows
    print_rows(rows, caption=caption)
    if out is not None:
        for path in write_tables(rows, out, caption):
            print(f"wrote {path}")
    _append_jsonl(
        Path(settings.log),
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(),
            "machine": platform.machine(),
            "cores": cores(),
            "load_average": load,
            "torch_threads": torch.get_num_threads(),
            "images": settings.images,
            "benches": names,
            "rows": rows,
        },
    )
    return rows
