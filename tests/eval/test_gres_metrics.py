"""refbench.eval.gres_metrics: ReLA's per-sentence rules and the two protocols' accuracies, on hand-counted
examples of every case, and against an independent implementation (tests/_gres_reference_eval.py)."""

from __future__ import annotations

import math

import _gres_reference_eval as ref
import numpy as np
import pytest

from refbench.errors import RefbenchError
from refbench.eval import gres_metrics as gm


def _iu(pred, gt):
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def a(*v):
    return np.array(v, dtype=bool)


Z = a(0, 0, 0, 0)
# (pred mask, pred no-target, gt mask, gt no-target): one sentence per case, counted by hand below
ITEMS = [
    (a(1, 1, 0, 0), False, a(1, 0, 0, 0), False),  # TN  I=1 U=2  IoU .5
    (a(1, 1, 1, 1), True, a(1, 1, 0, 0), False),   # FP: targeted flagged no-target, stray pixels: I := 0, U = 4 kept, IoU 0
    (a(1, 0, 1, 0), True, Z, True),                # TP: flagged no-target with a stray mask: IoU 1, adds nothing
    (a(1, 1, 1, 0), False, Z, True),               # FN: U = 3 into sum U, IoU 0
    (a(0, 1, 1, 1), False, a(0, 1, 1, 1), False),  # TN  I=3 U=3  IoU 1
]


def _arrays(items):
    iu = [_iu(p, g) for p, _, g, _ in items]
    return (np.array([i for i, _ in iu]), np.array([u for _, u in iu]),
            np.array([gn for *_, gn in items], bool), np.array([pn for _, pn, _, _ in items], bool))


def test_every_case_counted_by_hand():
    for protocol in ("original", "rela"):
        m = gm.summarize(*_arrays(ITEMS), protocol=protocol)
        assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 1, 1, 2)
        assert math.isclose(m["gIoU"], (0.5 + 0 + 1 + 0 + 1) / 5)
        assert math.isclose(m["cIoU"], (1 + 0 + 0 + 0 + 3) / (2 + 4 + 0 + 3 + 3))  # the FP's pixels stay in sum U
        assert math.isclose(m["Pr@0.7"], 1 / 3) and math.isclose(m["Pr@0.9"], 1 / 3)  # over TN + FP only
    o = gm.summarize(*_arrays(ITEMS), protocol="original")
    assert math.isclose(o["N-acc"], 1 / 2) and math.isclose(o["T-acc"], 2 / 3)  # TP/(TP+FN), TN/(TN+FP)
    r = gm.summarize(*_arrays(ITEMS), protocol="rela")
    assert math.isclose(r["N-acc"], 1 / 3) and math.isclose(r["T-acc"], 1 / 3)  # TP/(TP+FN+1), TP/(TP+FP+1)
    v = gm.per_sentence(*_arrays(ITEMS))
    assert v["case"].tolist() == [3, 2, 0, 1, 3] and v["U"].tolist() == [2, 4, 0, 3, 3] and v["I"].tolist() == [1, 0, 0, 0, 3]


def test_worked_example_of_the_docstring():
    # TP 8, FN 2, FP 3, TN 87 (masks perfect where targeted and predicted targeted)
    gt_nt = np.array([True] * 10 + [False] * 90)
    pred_nt = np.array([True] * 8 + [False] * 2 + [True] * 3 + [False] * 87)
    inter = np.where(gt_nt, 0, 5)
    union = np.where(gt_nt, np.where(pred_nt, 0, 2), 5)
    o = gm.summarize(inter, union, gt_nt, pred_nt, "original")
    r = gm.summarize(inter, union, gt_nt, pred_nt, "rela")
    assert round(o["N-acc"], 3) == 0.8 and round(o["T-acc"], 3) == 0.967
    assert round(r["N-acc"], 3) == 0.727 and round(r["T-acc"], 3) == 0.667


def test_no_no_target_sentence():
    i, u, g, p = np.array([3]), np.array([4]), np.array([False]), np.array([False])
    assert gm.summarize(i, u, g, p, "original")["N-acc"] is None  # nothing to count: null, not 0
    assert gm.summarize(i, u, g, p, "original")["T-acc"] == 1.0
    r = gm.summarize(i, u, g, p, "rela")
    assert r["N-acc"] == 0.0 and r["T-acc"] == 0.0  # ReLA's code
    only_tp = gm.summarize(np.array([0]), np.array([0]), np.array([True]), np.array([True]), "original")
    assert only_tp["cIoU"] is None and only_tp["Pr@0.7"] is None and only_tp["gIoU"] == 1.0


def test_bad_inputs():
    with pytest.raises(RefbenchError):
        gm.summarize(np.array([1]), np.array([2]), np.array([True]), np.array([False]))  # no-target GT with I > 0
    with pytest.raises(RefbenchError):
        gm.summarize(np.array([3]), np.array([2]), np.array([False]), np.array([False]))
    with pytest.raises(RefbenchError):
        gm.get_protocol("cris")


def test_breakdown_by_target_count():
    i, u, g, p = _arrays(ITEMS)
    b = gm.breakdown(i, u, g, p, [1, 2, 0, 0, 3], "original")
    assert list(b) == ["0", "1", "2", "3+"]
    assert b["0"]["n"] == 2 and b["0"]["N-acc"] == 0.5 and b["0"]["T-acc"] is None
    assert b["1"]["gIoU"] == 0.5 and b["2"]["T-acc"] == 0.0 and b["3+"]["gIoU"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(300):
        gt_nt = bool(rng.random() < 0.2)
        gt = np.zeros((12, 12), bool) if gt_nt else rng.random((12, 12)) < rng.uniform(0.05, 0.6)
        if not gt_nt and not gt.any():
            gt[0, 0] = True
        pred = rng.random((12, 12)) < rng.uniform(0, 0.6) if rng.random() < 0.9 else np.zeros((12, 12), bool)
        if rng.random() < 0.4 and not gt_nt:
            pred = gt.copy()  # some perfect ones, so Pr@X is exercised
        items.append((pred, bool(rng.random() < 0.25), gt, gt_nt))
    arrays = _arrays(items)
    theirs = {"rela": ref.rela_metrics(items, variant="initial"), "original": ref.named_metrics(items)}
    for protocol, t in theirs.items():
        m = gm.summarize(*arrays, protocol=protocol)
        assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (t["TP"], t["FN"], t["FP"], t["TN"])
        for ours, key in (("gIoU", "gIoU"), ("cIoU", "cIoU"), ("N-acc", "N_acc"), ("T-acc", "T_acc"),
                          ("Pr@0.7", "Pr@0.7"), ("Pr@0.8", "Pr@0.8"), ("Pr@0.9", "Pr@0.9")):
            assert math.isclose(m[ours], t[key], rel_tol=1e-12), (protocol, ours)
    ci = gm.bootstrap_ci(*arrays, protocol="original", samples=200)
    for k in gm.CI_KEYS:
        lo, hi = ci[k]
        assert 0 <= lo <= gm.summarize(*arrays)[k] <= hi <= 1 or lo <= hi


@pytest.mark.parametrize("protocol", ["original", "rela"])
def test_bootstrap_equals_summarize_on_every_resample(protocol):
    """The bootstrap's packed case counts and gathers give, per resample, exactly what `summarize`
    computes on that resample's sentences (same seeded draws), so the interval is theirs."""
    rng = np.random.default_rng(7)
    n = 300
    union = rng.integers(0, 400, n)
    inter = (union * rng.random(n)).astype(np.int64)
    gt_nt = rng.random(n) < 0.15
    inter[gt_nt] = 0
    pred_nt = gt_nt ^ (rng.random(n) < 0.1)
    samples, level = 40, 0.9
    stats = {k: [] for k in gm.CI_KEYS}
    for idx in np.random.default_rng(3).integers(0, n, size=(samples, n)):  # metrics._resamples' draws (one chunk)
        s = gm.summarize(inter[idx], union[idx], gt_nt[idx], pred_nt[idx], protocol)
        for k in gm.CI_KEYS:
            if s[k] is not None:
                stats[k].append(s[k])
    ci = gm.bootstrap_ci(inter, union, gt_nt, pred_nt, protocol, samples=samples, seed=3, level=level)
    for k in gm.CI_KEYS:
        lo, hi = np.quantile(stats[k], [(1 - level) / 2, (1 + level) / 2])
        assert ci[k] == pytest.approx([lo, hi], rel=1e-12, abs=1e-15), k
