"""The leaderboard's gRefCOCO (GRES) part: its columns, its reported rows, its legend and notes.

gRefCOCO records (`"task": "gres"`, refbench.eval.gres_records) and the reported rows of
`leaderboard/reported/gres/*.csv` get their own value columns, one per split, metric and
protocol: "val gIoU (%, rela)", "val N-acc (%, original)", ... for gIoU, cIoU, N-acc, T-acc and
Pr@0.7/0.8/0.9 under the protocols of refbench.eval.gres_metrics (`original`, `rela`). Their
metric names are not RefCOCO's (mIoU, oIoU), so a RefCOCO row and a gRefCOCO row never share a
column. A value a record holds as null (an accuracy with nothing to count) stays empty: "-" in md
and on the page, empty in csv, null in json. Values are percent, like every leaderboard value.

refbench.report.leaderboard builds the table and calls these; this module never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from refbench.data import datasets
from refbench.errors import RefbenchError
from refbench.eval import gres_metrics, gres_records

METRICS = gres_metrics.METRIC_KEYS  # gIoU, cIoU, N-acc, T-acc, Pr@0.7, Pr@0.8, Pr@0.9
PROTOCOLS = gres_metrics.PROTOCOLS
REPORTED_FOLDER = "gres"  # leaderboard/reported/gres/*.csv: the same columns as the RefCOCO rows


def is_record(rec: Any) -> bool:
    """Whether a result record is a gRefCOCO one."""
    return rec.meta.get("task") == gres_records.TASK


def long_rows(rec: Any, base: dict[str, Any], note: str) -> list[dict[str, Any]]:
    """The record's long rows (one per metric, percent; None where the record holds null)."""
    m = rec.metrics
    head = f"n={m['n']} sentences ({m['n_no_target']} no-target); masks and no-target decisions"
    rows = []
    for metric in METRICS:
        value = m.get(metric)
        rows.append({**base, "metric": metric, "value": None if value is None else 100.0 * value,
                     "note": head + note})
    return rows


def check_reported(path: Path, df: pl.DataFrame) -> None:
    """Refuse a gRefCOCO reported file whose metric, protocol or dataset is not GRES's."""
    bad = sorted(set(df["metric"]) - set(METRICS))
    if bad:
        raise RefbenchError(f"reported rows {path}: metric(s) {bad}; a gRefCOCO row is exactly one of {list(METRICS)}")
    bad = sorted(set(df["protocol"]) - set(PROTOCOLS))
    if bad:
        raise RefbenchError(f"reported rows {path}: unknown gRefCOCO protocol(s) {bad}; known: {list(PROTOCOLS)}")
    bad = sorted(d for d in set(df["dataset"]) if not datasets.is_gres(d))
    if bad:
        raise RefbenchError(f"reported rows {path}: dataset(s) {bad} are not gRefCOCO (e.g. grefcoco_unc)")


def is_column(metric: str) -> bool:
    return metric in METRICS


def column_rank(protocol: str, split_rank: tuple[int, str], metric: str) -> tuple:
    """Where a GRES column sorts: after every RefCOCO column, by protocol, split, metric."""
    order = list(PROTOCOLS)
    return (1, order.index(protocol) if protocol in order else 99, split_rank, METRICS.index(metric))


def columns_of(names: list[str]) -> list[str]:
    """The GRES value columns among `names` ("<split> <metric> (%, <protocol>)")."""
    return [c for c in names if " (%, " in c and len(c.split(" ")) >= 3 and is_column(c.split(" ")[1])]


def gres_datasets(table: pl.DataFrame) -> list[str]:
    """The datasets of the table's gRefCOCO rows."""
    return [d for d in dict.fromkeys(table["dataset"]) if datasets.is_gres(d)]


def legend(table: pl.DataFrame) -> list[str]:
    """The legend's gRefCOCO lines: only on a board that holds gRefCOCO rows."""
    if not gres_datasets(table):
        return []
    lines = [
        "gRefCOCO (generalized RIS: several or no targets) has its own columns, never shared with RefCOCO's:"
        " gIoU = mean per-sentence IoU (a no-target sentence recognised counts 1, missed 0); cIoU = sum I / sum U;"
        " N-acc, T-acc = the no-target accuracies as the protocol defines them; Pr@X = share of targeted sentences"
        " with IoU >= X. '-' = not reported, or a value with nothing to count (null in the record).",
    ]
    lines += [f"gRefCOCO protocol {p.name} (v{p.version}): {p.description}." for p in PROTOCOLS.values()]
    return lines


def protocols_doc() -> dict[str, dict]:
    """The json export's "gres_protocols": name -> version, description."""
    return {p.name: {"version": p.version, "description": p.description} for p in PROTOCOLS.values()}


def page_extra(table: pl.DataFrame) -> dict[str, Any]:
    """What the page needs beyond RefCOCO's data: which datasets are gRefCOCO, their protocols' notes."""
    found = gres_datasets(table)
    if not found:
        return {}
    return {"gres_datasets": found,
            "gres_protocol_notes": {p.name: f"v{p.version}, {p.description}" for p in PROTOCOLS.values()}}
