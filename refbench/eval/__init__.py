"""The eval stage: a model's masks (or anyone's submitted masks) -> metrics -> result records.

    metrics         the metric protocols (PROTOCOLS), I/U, mIoU/oIoU/Pr@X, bootstrap intervals, breakdowns
    evaluate        `refbench eval`: score a checkpoint on a split, every sentence (evaluate_checkpoint)
    truth           the ground truth of a split from the shards (sentences, ids, GT RLEs) for the scorers
    score           `refbench score` / `refbench sentences`: submitted masks against the ground truth
    predictions     `refbench predictions`: a checkpoint's masks in the submission format
    results         result records (schema v2) and their per-sentence parquet sidecars
    gres_metrics    gRefCOCO: ReLA's per-sentence rules, gIoU/cIoU/N-acc/T-acc, protocols original and rela
    gres_score      gRefCOCO submissions scored (`refbench score`/`sentences` on grefcoco_*)
    gres_records    gRefCOCO records: body, sidecar columns, the check on load
    diversity       query diversity figures of models with queries (EAVL)
    sensitivity     sentence sensitivity: how much mask and kernel move when the sentence is swapped
    visualize       overlays, per-query grids, `refbench predict`
    plots           training curves

Imports refbench.data, the root modules and refbench.models; nothing above.
"""

from __future__ import annotations

from refbench import lazy_exports

_EXPORTS = {  # public name -> the module of this package that defines it
    "PROTOCOLS": "metrics",
    "DEFAULT_PROTOCOL": "metrics",
    "Protocol": "metrics",
    "get_protocol": "metrics",
    "summarize": "metrics",
    "bootstrap_ci": "metrics",
    "paired_bootstrap": "metrics",
    "evaluate_checkpoint": "evaluate",
    "score_split": "evaluate",
    "SplitScores": "evaluate",
    "Evaluated": "evaluate",
    "score_submission": "score",
    "read_submission": "score",
    "ground_truth": "truth",
    "Record": "results",
    "write_record": "results",
    "load_record": "results",
    "iter_records": "results",
    "compare_records": "results",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
