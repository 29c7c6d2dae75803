"""Generalized RIS (gRefCOCO) scoring: gIoU, cIoU, N-acc, T-acc, Pr@X under two named protocols.

Per sentence the prediction is a mask plus a no-target decision ("the expression refers to
nothing"). "Positive" means no-target, as in ReLA's evaluator (henghuiding/ReLA,
gres_model/evaluation/refer_evaluation.py). With I = |pred AND gt| and U = |pred OR gt| counted
on the raw predicted mask (never zeroed by a no-target decision):

    GT        predicted    case  IoU (gIoU)    adds to sum I   adds to sum U   in Pr@X
    no-target no-target    TP    1             0               0               no
    no-target targeted     FN    0             0               U (= |pred|)    no
    targeted  no-target    FP    0             0 (I := 0)      U (pred | gt)   yes, IoU 0
    targeted  targeted     TN    I/U (0 if 0)  I               U               yes

    gIoU = mean IoU over all sentences       cIoU = sum I / sum U
    Pr@X = share of targeted sentences (TN + FP) with IoU >= X, X in 0.7, 0.8, 0.9

All values are fractions in [0, 1] (ReLA prints gIoU, cIoU and Pr@X x100). The protocols:

- `original` (the default): I and U at the image's own size; the accuracies say what their
  names say: N-acc = TP / (TP + FN), the no-target sentences recognised, and
  T-acc = TN / (TN + FP), the targeted sentences not lost to the no-target decision. A value
  without sentences to count (N-acc on a split without no-target sentences) is null, never 0.
- `rela`: ReLA's numbers exactly. The image is square-resized to 480x480 (detectron2's Resize,
  no letterbox), the GT polygons are scaled by (480/w, 480/h) and rasterised at 480x480 with
  pycocotools, and I, U are counted there (a submission's masks must be 480x480, ReLA's output
  size). Its accuracies are the ones its code computes (the paper's code, ReLA's `original`
  branch and first commit):

      N-acc = TP / (TP + FN + 1)      T-acc = TP / (TP + FP + 1)

  both 0 when the split has no no-target sentence, as there.

Where ReLA's code and the names part, a worked example: 100 sentences, 10 no-target (8
recognised: TP 8, FN 2) and 90 targeted (3 of them flagged no-target: FP 3, TN 87).

    original: N-acc = 8 / 10 = 0.800          T-acc = 87 / 90 = 0.967
    rela:     N-acc = 8 / (10 + 1) = 0.727    T-acc = 8 / (8 + 3 + 1) = 0.667

ReLA's "T-acc" is a smoothed precision of the no-target decision, not an accuracy on targeted
sentences: a model that never says no-target gets T-acc 0 there (TP = 0) although it loses no
targeted sentence (T-acc 1 by the name), and the +1 keeps N-acc below 1 even when every
no-target sentence is recognised. (ReLA's main branch switched to the named definitions in
884ef17 "fix eval metrics"; the published numbers were computed before.) gIoU, cIoU and Pr@X
are the same under both protocols, bar the resolution where I and U are counted.

Nothing here reads files; `refbench.eval.gres_score` turns shards and submissions into the arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refbench.errors import RefbenchError
from refbench.eval.metrics import Protocol, _interval, _resamples

RELA_SIZE = 480  # ReLA's INPUT.IMAGE_SIZE: image, GT and prediction are all 480x480 there
PR_THRESHOLDS: tuple[tuple[int, int], ...] = ((7, 10), (8, 10), (9, 10))
PR_KEYS = tuple(f"Pr@{n / d:.1f}" for n, d in PR_THRESHOLDS)
METRIC_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc", *PR_KEYS)  # every value summarize() returns
CI_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc")  # those with bootstrap intervals
CASES = ("TP", "FN", "FP", "TN")
TARGET_BUCKETS = ("0", "1", "2", "3+")  # the breakdown by GT target count

PROTOCOLS: dict[str, Protocol] = {
    "original": Protocol(
        name="original", version=1, resolution="original",
        description=("gRefCOCO at the original image size: ReLA's per-sentence rules (TP IoU 1, FN/FP IoU 0, "
                     "raw predicted pixels in cIoU), N-acc = TP/(TP+FN), T-acc = TN/(TN+FP)"),
    ),
    "rela": Protocol(
        name="rela", version=1, resolution="input",
        description=("ReLA's evaluator exactly: I/U at 480x480 (square resize, GT polygons scaled and rasterised "
                     "there), N-acc = TP/(TP+FN+1), T-acc = TP/(TP+FP+1) as its code computes them"),
    ),
}
DEFAULT_PROTOCOL = "original"


def get_protocol(name: str) -> Protocol:
    """The gRefCOCO protocol `name`; one line naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise RefbenchError(f"unknown gRefCOCO metric protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def check_inputs(inter: Any, union: Any, gt_nt: Any, pred_nt: Any) -> tuple[np.ndarray, ...]:
    """Per-sentence I, U (int64), GT and predicted no-target (bool), checked: equal 1-D lengths,
    0 <= I <= U, a no-target GT with I = 0 (its mask is empty)."""
    i, u = np.asarray(inter), np.asarray(union)
    g, p = np.asarray(gt_nt), np.asarray(pred_nt)
    if not (i.ndim == u.ndim == g.ndim == p.ndim == 1 and i.shape == u.shape == g.shape == p.shape):
        raise RefbenchError(f"I, U, GT and predicted no-target must be 1-D of one length, got {i.shape}, {u.shape}, {g.shape}, {p.shape}")
    if i.size == 0:
        raise RefbenchError("no sentences to score")
    if g.dtype != bool or p.dtype != bool:
        raise RefbenchError("the no-target columns must be booleans")
    i, u = i.astype(np.int64), u.astype(np.int64)
    if (i < 0).any() or (i > u).any():
        raise RefbenchError("I and U must be pixel counts with 0 <= I <= U")
    if (i[g] != 0).any():
        raise RefbenchError("a no-target sentence has I > 0: its GT mask is not empty")
    return i, u, g, p


def per_sentence(inter, union, gt_nt, pred_nt) -> dict[str, np.ndarray]:
    """The rules' per-sentence values: case (0..3 = TP, FN, FP, TN), IoU, what it adds to sum I and sum U."""
    i, u, g, p = check_inputs(inter, union, gt_nt, pred_nt)
    case = np.where(g, np.where(p, 0, 1), np.where(p, 2, 3))
    tn = case == 3
    iou = np.zeros(i.shape, np.float64)
    np.divide(i, u, out=iou, where=tn & (u > 0))
    iou[case == 0] = 1.0
    add_i = np.where(tn, i, 0)
    add_u = np.where(case == 0, 0, u)
    return {"case": case, "IoU": iou, "I": add_i, "U": add_u}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def _accuracies(tp, fn, fp, tn, protocol: str):
    """(N-acc, T-acc) from the case counts (scalars or arrays for the bootstrap)."""
    if protocol == "rela":
        has_nt = np.asarray(tp + fn) > 0  # ReLA: both 0 without a no-target GT sentence
        return np.where(has_nt, tp / (tp + fn + 1), 0.0), np.where(has_nt, tp / (tp + fp + 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(tp / (tp + fn), dtype=float), np.asarray(tn / (tn + fp), dtype=float)


def _summary(v: dict[str, np.ndarray], pr_iou: tuple[np.ndarray, np.ndarray], protocol: str) -> dict[str, Any]:
    case = v["case"]
    counts = [int(np.count_nonzero(case == k)) for k in range(4)]
    tp, fn, fp, tn = counts
    n_acc, t_acc = _accuracies(np.float64(tp), np.float64(fn), np.float64(fp), np.float64(tn), protocol)
    targeted = fp + tn
    num_i, num_u = pr_iou  # exact integer Pr@X: IoU >= n/d <=> d*I >= n*U (I := 0 for FP)
    out = {
        "n": int(case.size), "n_no_target": tp + fn, "n_targeted": targeted,
        "gIoU": float(v["IoU"].mean()),
        "cIoU": _ratio(int(v["I"].sum()), int(v["U"].sum())),
        "N-acc": None if not np.isfinite(n_acc) else float(n_acc),
        "T-acc": None if not np.isfinite(t_acc) else float(t_acc),
    }
    sel = case >= 2
    for key, (n, d) in zip(PR_KEYS, PR_THRESHOLDS):
        hits = int(np.count_nonzero(sel & (num_u > 0) & (d * num_i >= n * num_u)))
        out[key] = _ratio(hits, targeted)
    out.update(dict(zip(CASES, counts)))
    return out


def summarize(inter, union, gt_nt, pred_nt, protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """{n, n_no_target, n_targeted, gIoU, cIoU, N-acc, T-acc, Pr@0.7..0.9, TP, FN, FP, TN}: fractions in
    [0, 1], None where a value has nothing to count (cIoU with sum U = 0, Pr@X without targeted
    sentences, the original protocol's N-acc / T-acc without sentences of their kind)."""
    get_protocol(protocol)
    v = per_sentence(inter, union, gt_nt, pred_nt)
    i_pr = np.where(v["case"] == 3, v["I"], 0)
    return _summary(v, (i_pr, v["U"]), protocol)


def target_bucket(n_targets: int) -> str:
    """The breakdown label of a GT target count: "0", "1", "2", "3+"."""
    return TARGET_BUCKETS[min(int(n_targets), 3)]


def breakdown(inter, union, gt_nt, pred_nt, n_targets, protocol: str = DEFAULT_PROTOCOL) -> dict[str, dict]:
    """gIoU, cIoU and the accuracies per GT target count bucket ("0", "1", "2", "3+"; empty ones left out)."""
    i, u, g, p = check_inputs(inter, union, gt_nt, pred_nt)
    bucket = np.minimum(np.asarray(n_targets, dtype=np.int64), len(TARGET_BUCKETS) - 1)  # index into TARGET_BUCKETS
    out = {}
    for k, label in enumerate(TARGET_BUCKETS):
        sel = bucket == k
        if sel.any():
            s = summarize(i[sel], u[sel], g[sel], p[sel], protocol)
            out[label] = {k: s[k] for k in ("n", "gIoU", "cIoU", "N-acc", "T-acc", *CASES)}
    return out


_COUNT_BITS = 21  # the bootstrap packs TP, FN and FP counts in one int64, 21 bits each (n < 2**21 sentences)


def bootstrap_ci(inter, union, gt_nt, pred_nt, protocol: str = DEFAULT_PROTOCOL, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals over sentences of gIoU, cIoU, N-acc and T-acc (seeded, as
    refbench.eval.metrics.bootstrap_ci); None for a value the full set leaves undefined. Resamples
    where a value is undefined (no no-target sentence drawn, say) are left out of its interval.

    Four gathers per resample: IoU, I, U, and the case counted in one int64 (TP in bits 0-20, FN in
    21-41, FP in 42-62; TN = n minus the three), so every count is exact."""
    v = per_sentence(inter, union, gt_nt, pred_nt)
    full = summarize(inter, union, gt_nt, pred_nt, protocol)
    n = v["case"].size
    if n >= 1 << _COUNT_BITS:
        raise RefbenchError(f"the gRefCOCO bootstrap counts up to {(1 << _COUNT_BITS) - 1} sentences, got {n}")
    packed = np.array([1, 1 << _COUNT_BITS, 1 << 2 * _COUNT_BITS, 0], np.int64)[v["case"]]  # [n]
    iou, add_i, add_u = v["IoU"], v["I"], v["U"]
    giou, si, su, cases = [], [], [], []
    for idx in _resamples(n, samples, seed):
        giou.append(iou[idx].mean(axis=1))
        si.append(add_i[idx].sum(axis=1))
        su.append(add_u[idx].sum(axis=1))
        cases.append(packed[idx].sum(axis=1))
    c = np.concatenate(cases)
    low = (1 << _COUNT_BITS) - 1
    tp, fn, fp = (((c >> (k * _COUNT_BITS)) & low).astype(np.float64) for k in range(3))
    n_acc, t_acc = _accuracies(tp, fn, fp, n - tp - fn - fp, protocol)
    su_all = np.concatenate(su).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ciou = np.where(su_all > 0, np.concatenate(si) / su_all, np.nan)
    stats = {"gIoU": np.concatenate(giou), "cIoU": ciou, "N-acc": n_acc, "T-acc": t_acc}
    out = {}
    for k in CI_KEYS:
        a = stats[k][np.isfinite(stats[k])]
        out[k] = None if full[k] is None or a.size == 0 else list(_interval(a, level))
    return out
