"""gRefCOCO result records: the sidecar's columns, the record body (protocol, metrics, breakdowns)
computed from per-sentence values, and the check `refbench.eval.results.load_record` runs on a
record with `"task": "gres"` (every metric and breakdown recomputed from its sidecar; the bootstrap
intervals checked for shape, as RefCOCO records' are, not redrawn).

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


def record_body(*, protocol: str, inter, union, gt_nt, pred_nt, n_targets, samples: int = 1000, seed: int = 0,
                intervals: bool = True) -> dict:
    """The record's `protocol`, `metrics` and `breakdowns` for these per-sentence values; without
    `intervals`, the metrics lack `ci95` and `bootstrap` (the check on load, as RefCOCO's, recomputes
    every value but the bootstrap, whose intervals it checks for shape)."""
    proto = gres_metrics.get_protocol(protocol)
    values = gres_metrics.summarize(inter, union, gt_nt, pred_nt, protocol)
    if intervals:
        values["ci95"] = gres_metrics.bootstrap_ci(inter, union, gt_nt, pred_nt, protocol, samples=samples, seed=seed)
        values["bootstrap"] = {"samples": samples, "seed": seed, "level": 0.95}
    return {
        "protocol": {"name": proto.name, "version": proto.version, "threshold": None, "description": proto.description,
                     "pr_strict": False, "resolution": f"{gres_metrics.RELA_SIZE}x{gres_metrics.RELA_SIZE}" if protocol == "rela" else "original"},
        "metrics": values,
        "breakdowns": {"n_targets": gres_metrics.breakdown(inter, union, gt_nt, pred_nt, n_targets, protocol)},
    }


def _interval_problem(ci: Any, metrics: dict) -> str | None:
    """Why the stored `ci95` is not an interval per CI key within [0, 1] (null exactly where the value is), or None."""
    if not isinstance(ci, dict):
        return "metrics.ci95 is not an object"
    for key in gres_metrics.CI_KEYS:
        pair = ci.get(key)
        if metrics.get(key) is None:
            if pair is not None:
                return f"metrics.ci95.{key} is an interval of a value that is null"
        elif pair is not None and not (isinstance(pair, list) and len(pair) == 2
                                       and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
                                       and 0.0 <= pair[0] <= pair[1] <= 1.0):
            return f"metrics.ci95.{key} is not an interval [lo, hi] within [0, 1]"
    return None


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
    stored = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    try:
        body = record_body(protocol=proto.get("name"), inter=df["I"].to_numpy(), union=df["U"].to_numpy(),
                           gt_nt=(df["n_targets"] == 0).to_numpy(), pred_nt=df["pred_no_target"].to_numpy(),
                           n_targets=df["n_targets"].to_list(), intervals=False)
    except (RefbenchError, KeyError, TypeError) as e:
        raise bad(f"its sentences cannot be rescored ({e})") from None
    values = {k: v for k, v in stored.items() if k not in ("ci95", "bootstrap")}
    for key, have in (("protocol", meta.get("protocol")), ("metrics", values), ("breakdowns", meta.get("breakdowns"))):
        if not _same(have, body[key]):
            raise bad(f"stored {key} disagree with its sentences")
    problem = _interval_problem(stored.get("ci95"), values)
    if problem or not isinstance(stored.get("bootstrap"), dict):
        raise bad(problem or "metrics.bootstrap is missing")
    return df
