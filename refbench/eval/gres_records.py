"""gRefCOCO result records: the sidecar's columns, the record body (protocol, metrics, breakdowns)
computed from per-sentence values, and the check `refbench.eval.results.load_record` runs on a
record with `"task": "gres"` (every metric and breakdown recomputed from its sidecar).

Below refbench.eval.results and refbench.eval.gres_score (which writes the records), so that the
record reader and the scorer do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from refbench.errors import RefbenchError
from refbench.eval import gres_metrics
from refbench.eval.sidecar import read_sidecar

GRES_COLUMNS: dict[str, Any] = {
    "sent_id": pl.Int64, "ref_id": pl.Int64, "image_id": pl.Int64, "n_targets": pl.Int64, "sent": pl.String,
    "I": pl.Int64, "U": pl.Int64, "pred_no_target": pl.Boolean,
}
TASK = "gres"


def record_body(*, protocol: str, inter, union, gt_nt, pred_nt, n_targets, samples: int = 1000, seed: int = 0) -> dict:
    """The record's `protocol`, `metrics` and `breakdowns` for these per-sentence values."""
    proto = gres_metrics.get_protocol(protocol)
    ci = gres_metrics.bootstrap_ci(inter, union, gt_nt, pred_nt, protocol, samples=samples, seed=seed)
    return {
        "protocol": {"name": proto.name, "version": proto.version, "threshold": None, "description": proto.description,
                     "pr_strict": False, "resolution": f"{gres_metrics.RELA_SIZE}x{gres_metrics.RELA_SIZE}" if protocol == "rela" else "original"},
        "metrics": {**gres_metrics.summarize(inter, union, gt_nt, pred_nt, protocol), "ci95": ci,
                    "bootstrap": {"samples": samples, "seed": seed, "level": 0.95}},
        "breakdowns": {"n_targets": gres_metrics.breakdown(inter, union, gt_nt, pred_nt, n_targets, protocol)},
    }


def _same(stored: Any, value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(stored, dict) and stored.keys() == value.keys() and all(_same(stored[k], value[k]) for k in value)
    if isinstance(value, list):
        return isinstance(stored, list) and len(stored) == len(value) and all(_same(a, b) for a, b in zip(stored, value))
    if value is None or isinstance(value, (bool, int, str)):
        return type(stored) is type(value) and stored == value
    return isinstance(stored, (int, float)) and abs(stored - value) <= 1e-12 * max(1.0, abs(value))


def check_record(path: Path, meta: dict) -> pl.DataFrame:
    """Check a gRefCOCO record (`task: gres`) read from `path`: its sidecar's hash and columns,
    every metric and breakdown recomputed from the sidecar. Returns the sidecar's frame
    (refbench.eval.results.load_record wraps both in a Record)."""

    def bad(what: str) -> RefbenchError:
        return RefbenchError(f"result record {path}: {what}")

    df = read_sidecar(path, meta, list(GRES_COLUMNS), bad)
    proto = meta.get("protocol") if isinstance(meta.get("protocol"), dict) else {}
    try:
        body = record_body(protocol=proto.get("name"), inter=df["I"].to_numpy(), union=df["U"].to_numpy(),
                           gt_nt=(df["n_targets"] == 0).to_numpy(), pred_nt=df["pred_no_target"].to_numpy(),
                           n_targets=df["n_targets"].to_list(), **{k: meta["metrics"]["bootstrap"][k] for k in ("samples", "seed")})
    except (RefbenchError, KeyError, TypeError) as e:
        raise bad(f"its sentences cannot be rescored ({e})") from None
    for key in ("protocol", "metrics", "breakdowns"):
        if not _same(meta.get(key), body[key]):
            raise bad(f"stored {key} disagree with its sentences")
    return df
