"""(Test code: copied from the GRES spec, an independent implementation that refbench's code is checked against.)

Independent re-implementation of ReLA's gRefCOCO evaluation rules (numpy only).

Written from the rules in henghuiding/ReLA, file gres_model/evaluation/refer_evaluation.py
(main @ 3ca9551; the rules have been the same since commit 884ef17, "fix eval metrics").
No ReLA code is copied; line numbers (Lxxx) below point into that file.

One item per sentence: (pred_mask, pred_no_target, gt_mask, gt_no_target)
  pred_mask      bool/0-1 array, or None (meaning empty). ReLA gets it from the raw
                 argmax of the 2-channel mask head (L50) and does NOT zero it when the
                 no-target head fires, so pass the raw mask if you want ReLA's numbers.
  pred_no_target bool, from argmax of the 2-logit no-target head (L56); 1 = no target.
  gt_mask        bool/0-1 array (all zero for no-target), or None (meaning empty).
  gt_no_target   bool, the dataset's 'empty' flag (ann_id == [-1]) (L65).
In ReLA both masks are 480x480 (image and GT polygons resized to INPUT.IMAGE_SIZE).

Per-sentence rules:
  I = |pred & gt|, U = |pred | gt|, always from the raw masks (L14-18, L126).
  gt no-target, pred no-target   -> TP; IoU 1; adds 0 to cum_I and 0 to cum_U (L134-141)
  gt no-target, pred target      -> FN; IoU 0; adds 0 to cum_I, U (= |pred|) to cum_U (L144-151)
  gt target,    pred no-target   -> FP; I is set to 0 but U stays |pred | gt|; IoU 0 (L156-158)
  gt target,    pred target      -> TN; IoU = I/U (0 if U == 0) (L162-164)
  targeted sentences (TN and FP) add I and U to cum_I / cum_U (L166-168) and are the
  only ones counted for Pr@t, which is `IoU >= t` (L170-174).
Totals (L190-202; ReLA multiplies gIoU, cIoU and Pr by 100, but not the accuracies):
  gIoU = sum(IoU) / all sentences;   cIoU = cum_I / cum_U
  Pr@t = #(targeted with IoU >= t) / #targeted
  when there is at least one no-target GT:  T_acc = TN/(TN+FP), N_acc = TP/(TP+FN)
  otherwise T_acc = N_acc = 0 (L194-198).
  The first commit (a389648, before 884ef17) had T_acc = TP/(TP+FP+1) and
  N_acc = TP/(TP+FN+1); see variant="initial".
A zero denominator raises ZeroDivisionError, the way ReLA itself does.
All values returned here are fractions in [0, 1].
"""
import math

import numpy as np

PR_THRESHOLDS = (0.7, 0.8, 0.9)


def _count_iu(pred, gt):
    """Return (intersection, union) pixel counts; None stands for an empty mask."""
    if pred is None and gt is None:
        return 0, 0
    if pred is None:
        return 0, int(np.count_nonzero(gt))
    if gt is None:
        return 0, int(np.count_nonzero(pred))
    p = np.asarray(pred).astype(bool)
    g = np.asarray(gt).astype(bool)
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def _accumulate(items):
    tally = {"TP": 0, "FN": 0, "FP": 0, "TN": 0}
    cum_i = cum_u = 0
    iou_sum = 0.0
    n = 0
    targeted = 0
    pr_hits = {t: 0 for t in PR_THRESHOLDS}
    for pred_mask, pred_nt, gt_mask, gt_nt in items:
        inter, union = _count_iu(pred_mask, gt_mask)
        n += 1
        if gt_nt:
            if pred_nt:                  # TP: counts as IoU 1, adds nothing to cum_I / cum_U
                tally["TP"] += 1
                iou_sum += 1.0
            else:                        # FN: IoU 0, predicted pixels go into cum_U
                tally["FN"] += 1
                cum_u += union
            continue
        if pred_nt:                      # FP: intersection dropped, union kept
            tally["FP"] += 1
            inter = 0
        else:
            tally["TN"] += 1
        iou = 0.0 if union == 0 else inter / union
        iou_sum += iou
        cum_i += inter
        cum_u += union
        targeted += 1
        for t in PR_THRESHOLDS:
            if iou >= t:
                pr_hits[t] += 1
    return tally, cum_i, cum_u, iou_sum, n, targeted, pr_hits


def rela_metrics(items, variant="main"):
    """Metrics the way ReLA's ReferEvaluator computes them, as fractions.

    variant="main": the current rules (since commit 884ef17).
    variant="initial": the first commit's T_acc = TP/(TP+FP+1) and N_acc = TP/(TP+FN+1).
    """
    if variant not in ("main", "initial"):
        raise ValueError(variant)
    tally, cum_i, cum_u, iou_sum, n, targeted, pr_hits = _accumulate(items)
    tp, fn, fp, tn = tally["TP"], tally["FN"], tally["FP"], tally["TN"]
    out = {
        "gIoU": iou_sum / n,
        "cIoU": cum_i / cum_u,
    }
    if tp + fn > 0:                      # at least one no-target GT sentence
        if variant == "main":
            out["T_acc"] = tn / (tn + fp)
            out["N_acc"] = tp / (tp + fn)
        else:
            out["T_acc"] = tp / (tp + fp + 1)
            out["N_acc"] = tp / (tp + fn + 1)
    else:
        out["T_acc"] = out["N_acc"] = 0.0
    for t in PR_THRESHOLDS:
        out["Pr@%.1f" % t] = pr_hits[t] / targeted
    out.update(tally, cum_I=cum_i, cum_U=cum_u, n=n, n_targeted=targeted)
    return out


def named_metrics(items):
    """Same accumulation, but N-acc = TP/(TP+FN) and T-acc = TN/(TN+FP) with no special
    cases: NaN where a denominator is 0, rather than ReLA's 0 / ZeroDivisionError."""
    tally, cum_i, cum_u, iou_sum, n, targeted, pr_hits = _accumulate(items)
    tp, fn, fp, tn = tally["TP"], tally["FN"], tally["FP"], tally["TN"]

    def ratio(a, b):
        return a / b if b else math.nan

    out = {
        "gIoU": ratio(iou_sum, n),
        "cIoU": ratio(cum_i, cum_u),
        "N_acc": ratio(tp, tp + fn),
        "T_acc": ratio(tn, tn + fp),
    }
    for t in PR_THRESHOLDS:
        out["Pr@%.1f" % t] = ratio(pr_hits[t], targeted)
    out.update(tally, cum_I=cum_i, cum_U=cum_u, n=n, n_targeted=targeted)
    return out


if __name__ == "__main__":
    a = lambda *v: np.array(v, dtype=bool)  # noqa: E731
    Z = a(0, 0, 0, 0)

    # Example 1: one sentence in each case, plus a perfect one.
    items = [
        (a(1, 1, 0, 0), False, a(1, 0, 0, 0), False),  # TN  I=1 U=2  IoU .5
        (a(1, 1, 1, 1), True,  a(1, 1, 0, 0), False),  # FP  I:=0 U=4 IoU 0
        (a(1, 0, 0, 0), True,  Z,             True),   # TP  IoU 1, adds nothing
        (a(1, 1, 1, 0), False, Z,             True),   # FN  U=3 into cum_U, IoU 0
        (a(0, 1, 1, 1), False, a(0, 1, 1, 1), False),  # TN  I=3 U=3  IoU 1
    ]
    m = rela_metrics(items)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 1, 1, 2)
    assert (m["cum_I"], m["cum_U"]) == (4, 12)          # 1+0+0+0+3 / 2+4+0+3+3
    assert math.isclose(m["cIoU"], 4 / 12)
    assert math.isclose(m["gIoU"], (0.5 + 0 + 1 + 0 + 1) / 5)
    assert math.isclose(m["Pr@0.7"], 1 / 3) and math.isclose(m["Pr@0.9"], 1 / 3)
    assert math.isclose(m["N_acc"], 1 / 2) and math.isclose(m["T_acc"], 2 / 3)
    old = rela_metrics(items, variant="initial")
    assert math.isclose(old["T_acc"], 1 / 3)            # TP/(TP+FP+1) = 1/3
    assert math.isclose(old["N_acc"], 1 / 3)            # TP/(TP+FN+1) = 1/3
    n = named_metrics(items)
    assert math.isclose(n["N_acc"], 1 / 2) and math.isclose(n["T_acc"], 2 / 3)

    # Example 2: the FP sentence's raw mask counts toward cum_U. If it had been zeroed,
    # U for that sentence would be |gt| = 2 and cIoU would be 4/10, not 4/12.
    zeroed = list(items)
    zeroed[1] = (None, True, a(1, 1, 0, 0), False)
    assert math.isclose(rela_metrics(zeroed)["cIoU"], 4 / 10)
    # The TP sentence's mask never counts: giving it many pixels changes nothing.
    loud_tp = list(items)
    loud_tp[2] = (a(1, 1, 1, 1), True, Z, True)
    assert rela_metrics(loud_tp)["cum_U"] == 12

    # Example 3: Pr@t uses >=; IoU exactly 0.7, 0.8 and 0.9 reach their thresholds.
    gt10 = np.ones(10, dtype=bool)
    def pred_k(k):
        p = np.zeros(10, dtype=bool)
        p[:k] = True
        return p
    m = rela_metrics([(pred_k(7), False, gt10, False)])
    assert (m["Pr@0.7"], m["Pr@0.8"]) == (1.0, 0.0)
    m = rela_metrics([(pred_k(9), False, gt10, False)])
    assert (m["Pr@0.7"], m["Pr@0.8"], m["Pr@0.9"]) == (1.0, 1.0, 1.0)

    # Example 4: an FN with an empty predicted mask still scores IoU 0 (no-target is
    # decided by the NT head, not by the mask being empty) and adds 0 to cum_U.
    m = rela_metrics([(None, False, Z, True), (a(1, 0, 0, 0), False, a(1, 0, 0, 0), False)])
    assert m["FN"] == 1 and m["gIoU"] == 0.5 and m["cIoU"] == 1.0

    # Example 5: no no-target GT at all -> ReLA reports N_acc = T_acc = 0.
    m = rela_metrics([(a(1, 0, 0, 0), False, a(1, 0, 0, 0), False)])
    assert m["N_acc"] == 0.0 and m["T_acc"] == 0.0
    n = named_metrics([(a(1, 0, 0, 0), False, a(1, 0, 0, 0), False)])
    assert math.isnan(n["N_acc"]) and n["T_acc"] == 1.0

    # Example 6: only no-target sentences -> ReLA divides by zero (Pr@ has no targeted).
    try:
        rela_metrics([(None, True, Z, True)])
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("ReLA raises here (cum_U == 0)")

    print("reference_eval: all examples pass")
