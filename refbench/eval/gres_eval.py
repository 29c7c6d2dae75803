"""`refbench eval` on a gRefCOCO dataset (`grefcoco_unc`): the no-target decision of a model, the
record it publishes and the table it prints.

- Decision (`no_target_decision`): a model with a no-target head (EAVL/CRIS `nt_head=True`) says
  "no target" when its `nt_logit` > 0; any other model when its binarised mask, at the image's
  size, is empty (the rule refbench.eval.gres_score applies to a submission without the key).
- Protocol: gRefCOCO's `original` (refbench.eval.gres_metrics): I and U at the image's own size,
  as refbench's `original` counts them; `rela` (480x480 square resize) is for submissions
  (`refbench predictions` masks resized, `refbench score --protocol rela`), not for eval.
- Record: refbench.eval.gres_score.write_record (task "gres", sidecar with per-sentence raw I, U,
  n_targets, pred_no_target; every metric recomputed from it on load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refbench.errors import RefbenchError
from refbench.eval import gres_metrics, gres_score
from refbench.eval.gres_records import TASK

__all__ = ["TASK", "check_protocol", "no_target_decision", "print_scores", "write_record"]
PROTOCOL = "original"  # the gRefCOCO protocol `refbench eval` scores under (gres_metrics)


def check_protocol(protocol: str, dataset: str) -> None:
    """Refuse an eval protocol other than `original` on a gRefCOCO dataset (one line)."""
    if protocol != PROTOCOL:
        raise RefbenchError(f"refbench eval scores {dataset} under the gRefCOCO protocol original only, not {protocol!r}",
                            hint="for ReLA's 480x480 protocol write masks with `refbench predictions` and use "
                                 "`refbench score --protocol rela`")


def no_target_decision(out: dict, inter: np.ndarray, union: np.ndarray, batch: dict) -> np.ndarray:
    """bool [B]: nt_logit > 0 where the model outputs one, else "the binarised mask is empty".

    The predicted area at the image's size is I + (U - GT area) (I and U of the `original` protocol)."""
    if "nt_logit" in out:
        return (out["nt_logit"].detach().float() > 0).cpu().numpy().reshape(-1)
    gt_area = np.array([int(g.sum()) for g in batch["gt_mask"]], dtype=np.int64)
    return (np.asarray(inter) + np.asarray(union) - gt_area) == 0


def write_record(results, *, dataset: str, split: str, model, manifest: dict, manifest_sha: str, columns: dict) -> Path:
    """Publish the gRefCOCO record of one scored split (atomic, refbench.eval.gres_score.write_record)."""
    from refbench.eval import results as results_mod

    cols = {k: columns[k] for k in ("sent_id", "ref_id", "image_id", "n_targets", "sent", "I", "U", "pred_no_target")}
    return gres_score.write_record(
        results, dataset=dataset, split=split, protocol=PROTOCOL, model=model,
        data=results_mod.DataInfo(manifest_sha256=manifest_sha, sentences_expected=manifest["splits"][split]["sentences"],
                                  synthetic=bool(manifest.get("synthetic", False))),
        columns=cols, source="measured",
    )


def pct(v) -> str:
    """A fraction as a percentage with 2 decimals, "n/a" for None."""
    return "n/a" if v is None else f"{100 * v:.2f}"


def print_scores(done: list) -> None:
    """The table of `refbench eval` for gRefCOCO records: gIoU, cIoU, N-acc, T-acc per split, each
    column named with its protocol, the dataset and whether it is synthetic."""
    from rich.console import Console
    from rich.table import Table

    from refbench.eval import results as results_mod

    console = Console()
    first = done[0]
    recs = [results_mod.load_record(e.path) for e in done]
    synthetic = " (synthetic data)" if all(r.meta["data"].get("synthetic") for r in recs) else ""
    p = recs[0].protocol
    table = Table(title=f"{first.model.name}/{first.model.variant} ({first.model.run}) on {first.dataset}{synthetic}, "
                        f"gRefCOCO protocol {p['name']} v{p['version']}: {p['description']}", title_justify="left")
    for c in ("dataset", "split", "protocol", "n (no-target)", "gIoU % [95% CI]", "cIoU % [95% CI]", "N-acc %", "T-acc %",
              *[f"{k} %" for k in gres_metrics.PR_KEYS], "TP/FN/FP/TN"):
        table.add_column(c, justify="left" if c in ("dataset", "split", "protocol") else "right")
    for e, rec in zip(done, recs):
        m, ci = rec.metrics, rec.metrics["ci95"]

        def with_ci(k):
            return pct(m[k]) + (f" [{pct(ci[k][0])}, {pct(ci[k][1])}]" if ci.get(k) else "")

        table.add_row(e.dataset, e.split, rec.protocol["name"], f"{m['n']} ({m['n_no_target']})", with_ci("gIoU"),
                      with_ci("cIoU"), pct(m["N-acc"]), pct(m["T-acc"]), *[pct(m[k]) for k in gres_metrics.PR_KEYS],
                      f"{m['TP']}/{m['FN']}/{m['FP']}/{m['TN']}")
    console.print(table)
    head = "nt_logit > 0 (no-target head)" if first.model.config.get("nt_head") else "an empty binarised mask"
    console.print(f"no-target decision of {first.model.name}: {head}")
    for e in done:
        console.print(f"{e.split}: record {e.path} ({len(e.scores)} sentences, {e.scores.seconds_total:.1f} s)")
