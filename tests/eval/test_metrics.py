"""Metrics against hand-computed cases: I/U, mIoU/oIoU/Pr@X, thresholds, protocols, bootstrap, breakdowns."""

from __future__ import annotations

import time

import numpy as np
import pytest

from refbench.errors import RefbenchError
from refbench.eval import metrics

# --------------------------------------------------------------------------- I and U


def test_intersection_union_hand_case():
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    gt = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 1]], dtype=bool)
    inter, union = metrics.intersection_union(pred, gt)
    assert (inter, union) == (2, 5)
    assert type(inter) is int and type(union) is int


def test_intersection_union_nonzero_is_foreground_and_shapes_checked():
    # the refer toolkit sums overlapping polygons, so GT pixels may read 2
    assert metrics.intersection_union(np.array([[0, 3]]), np.array([[2, 2]])) == (1, 2)
    with pytest.raises(RefbenchError, match="differ in shape"):
        metrics.intersection_union(np.zeros((2, 3)), np.zeros((3, 2)))


def test_batch_matches_single_masks():
    rng = np.random.default_rng(0)
    pred = rng.random((5, 7, 9)) > 0.5
    gt = rng.random((5, 7, 9)) > 0.6
    inter, union = metrics.intersection_union_batch(pred, gt)
    assert inter.dtype == np.int64 and union.dtype == np.int64
    for k in range(5):
        assert (inter[k], union[k]) == metrics.intersection_union(pred[k], gt[k])


def test_batch_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pred = rng.random((4, 6, 6)) > 0.5
    gt = rng.random((4, 6, 6)) > 0.5
    i_np, u_np = metrics.intersection_union_batch(pred, gt)
    i_t, u_t = metrics.intersection_union_batch(torch.from_numpy(pred), torch.from_numpy(gt))
    assert i_t.dtype == np.int64
    np.testing.assert_array_equal(i_t, i_np)
    np.testing.assert_array_equal(u_t, u_np)


def test_binarize_is_strictly_greater():
    prob = np.array([0.34, 0.35, 0.36])
    np.testing.assert_array_equal(metrics.binarize(prob, 0.35), [False, False, True])


# --------------------------------------------------------------------------- summarize


def test_summarize_hand_case_with_empty_union_and_exact_thresholds():
    # IoUs: 0.7 exactly, empty union (counts 0), 0.5 exactly, 0.9 exactly
    inter = np.array([7, 0, 5, 9])
    union = np.array([10, 0, 10, 10])
    s = metrics.summarize(inter, union)
    assert s["n"] == 4
    assert s["mIoU"] == pytest.approx((0.7 + 0.0 + 0.5 + 0.9) / 4, abs=1e-15)
    assert s["oIoU"] == pytest.approx(21 / 30, abs=1e-15)
    assert s["Pr@0.5"] == 3 / 4  # 0.7, 0.5 (exactly on the threshold), 0.9
    assert s["Pr@0.6"] == 2 / 4
    assert s["Pr@0.7"] == 2 / 4  # 0.7 exactly passes
    assert s["Pr@0.8"] == 1 / 4
    assert s["Pr@0.9"] == 1 / 4  # 0.9 exactly passes
    assert set(s) == {"n", *metrics.METRIC_KEYS}


def test_thresholds_exact_where_floats_are_not():
    # A float32 IoU of 7/10 (as a GPU would compute it, then .item()) is below 0.7, and a
    # threshold built as 7 * 0.1 is above 0.7: both would drop this sentence from Pr@0.7;
    # the integer comparison keeps it.
    assert float(np.float32(7) / np.float32(10)) < 0.7
    assert 7 * 0.1 > 0.7
    for i, u in [(7, 10), (70_000, 100_000), (14, 20), (7_000_007, 10_000_010)]:
        s = metrics.summarize([i], [u])
        assert s["Pr@0.7"] == 1.0 and s["Pr@0.8"] == 0.0, (i, u)
    for i, u in [(9, 10), (63, 70), (1, 2), (123_456_789, 246_913_578)]:
        expected_09 = 1.0 if 10 * i >= 9 * u else 0.0
        assert metrics.summarize([i], [u])["Pr@0.9"] == expected_09
    assert metrics.summarize([1], [2])["Pr@0.5"] == 1.0
    assert metrics.summarize([6_999_999], [10_000_000])["Pr@0.7"] == 0.0  # just below


def test_all_empty_unions_score_zero_not_nan():
    s = metrics.summarize([0, 0], [0, 0])
    assert s["mIoU"] == 0.0 and s["oIoU"] == 0.0
    assert all(s[k] == 0.0 for k in metrics.PR_KEYS)


@pytest.mark.parametrize(
    "inter, union, message",
    [
        ([], [], "no sentences"),
        ([3], [2], "intersection larger than union"),
        ([1.5], [2], "integer pixel counts"),
        ([1, 2], [3], "same length"),
        ([-1], [2], "non-negative"),
    ],
)
def test_summarize_refuses_bad_input(inter, union, message):
    with pytest.raises(RefbenchError, match=message):
        metrics.summarize(np.array(inter), np.array(union))


# --------------------------------------------------------------------------- protocols


def test_protocol_registry():
    assert metrics.DEFAULT_PROTOCOL == "original"
    assert set(metrics.PROTOCOLS) == {"original", "cris", "input"}
    for name, p in metrics.PROTOCOLS.items():
        assert p.name == name and isinstance(p.version, int) and p.version >= 1
        assert p.description and "\n" not in p.description
    assert metrics.get_protocol("input").resolution == "input"
    assert metrics.get_protocol("cris").resolution == "original" and metrics.get_protocol("cris").preprocess == "cris"
    with pytest.raises(RefbenchError, match="unknown metric protocol 'lavt'"):
        metrics.get_protocol("lavt")


def _nearest_resize(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = (np.arange(h) * mask.shape[0]) // h
    cols = (np.arange(w) * mask.shape[1]) // w
    return mask[rows][:, cols]


def _letterbox(mask: np.ndarray, size: int) -> tuple[np.ndarray, int, int, int]:
    """Resize the long side to `size` (nearest) and pad top/bottom; returns (canvas, top, h, w)."""
    scale = size / max(mask.shape)
    h, w = round(mask.shape[0] * scale), round(mask.shape[1] * scale)
    top = (size - h) // 2
    canvas = np.zeros((size, size), dtype=bool)
    canvas[top : top + h, :w] = _nearest_resize(mask, h, w)
    return canvas, top, h, w


def test_protocols_differ_on_a_letterboxed_case():
    # Original image 4x8 (HxW); network input 4x4: scale 1/2, content rows 1..2, pad rows 0 and 3.
    gt = np.zeros((4, 8), dtype=bool)
    gt[:, 0:4] = True  # a 4x4 block ...
    gt[:, 5] = True  # ... and a 1-pixel-wide column the downscale cannot see (20 px in all)
    gt_input, top, h, w = _letterbox(gt, 4)
    assert (top, h, w) == (1, 2, 4)
    expected_gt_input = np.zeros((4, 4), dtype=bool)
    expected_gt_input[1:3, 0:2] = True  # the thin column vanished
    np.testing.assert_array_equal(gt_input, expected_gt_input)

    # The network predicts the block exactly, at input resolution.
    pred_input = expected_gt_input.copy()

    # protocol "input": compare at 4x4 with the resized GT -> perfect
    i_in, u_in = metrics.intersection_union(pred_input, gt_input)
    assert (i_in, u_in) == (4, 4)

    # protocol "original": undo the letterbox, upsample to 4x8, compare with the original GT
    pred_original = _nearest_resize(pred_input[top : top + h, :w], 4, 8)
    i_or, u_or = metrics.intersection_union(pred_original, gt)
    assert (i_or, u_or) == (16, 20)

    s_in = metrics.summarize([i_in], [u_in])
    s_or = metrics.summarize([i_or], [u_or])
    assert s_in["mIoU"] == 1.0 and s_in["Pr@0.9"] == 1.0
    assert s_or["mIoU"] == pytest.approx(0.8) and s_or["Pr@0.8"] == 1.0 and s_or["Pr@0.9"] == 0.0


def test_protocols_differ_through_refbench_transforms():
    """The same case through the real geometry: transforms.mask_to_input and to_original."""
    transforms = pytest.importorskip("refbench.data.transforms")
    torch = pytest.importorskip("torch")
    box = transforms.Letterbox.fit(width=8, height=4, size=4)  # scale 1/2, content rows 1..2
    assert (box.new_w, box.new_h, box.pad_x, box.pad_y) == (4, 2, 0, 1)
    gt = np.zeros((4, 8), dtype=np.uint8)
    gt[:, 0:5] = 1  # 20 px; nearest sampling at pixel centres reads columns 1, 3, 5, 7
    gt_input = transforms.mask_to_input(gt, box) != 0
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 0:2] = True  # column 4 fell between the samples
    np.testing.assert_array_equal(gt_input, expected)

    probs = torch.from_numpy(expected.astype(np.float32))[None, None]  # [1, 1, 4, 4]: a perfect input-size answer
    threshold = 0.35
    i_in, u_in = metrics.intersection_union(metrics.binarize(probs[0, 0].numpy(), threshold), gt_input)
    (orig,) = transforms.to_original(probs, [box])  # [4, 8], bilinear
    i_or, u_or = metrics.intersection_union(metrics.binarize(orig.numpy(), threshold), gt)
    # bilinear back-mapping: columns 0..3 read >= 0.75, column 4 reads 0.25 -> 16 px of the 20
    assert (i_in, u_in) == (4, 4)
    assert (i_or, u_or) == (16, 20)
    assert metrics.summarize([i_in], [u_in])["mIoU"] == 1.0
    assert metrics.summarize([i_or], [u_or])["mIoU"] == pytest.approx(0.8)


# --------------------------------------------------------------------------- bootstrap


def _synthetic_counts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    union = rng.integers(100, 1000, n)
    inter = (union * rng.beta(4, 2, n)).astype(np.int64)
    return inter, union


def test_bootstrap_ci_is_seeded_and_has_the_right_width():
    inter, union = _synthetic_counts(4000, 0)
    a = metrics.bootstrap_ci(inter, union, samples=500, seed=3)
    b = metrics.bootstrap_ci(inter, union, samples=500, seed=3)
    c = metrics.bootstrap_ci(inter, union, samples=500, seed=4)
    assert a == b and a != c
    ious = metrics.iou(inter, union)
    s = metrics.summarize(inter, union)
    lo, hi = a["mIoU"]
    assert lo < s["mIoU"] < hi
    # normal approximation of the mean's 95% interval: 2 * 1.96 * sd / sqrt(n)
    expected = 2 * 1.96 * ious.std() / np.sqrt(ious.size)
    assert hi - lo == pytest.approx(expected, rel=0.15)
    lo, hi = a["oIoU"]
    assert lo < s["oIoU"] < hi


def test_bootstrap_constant_iou_has_zero_width():
    ci = metrics.bootstrap_ci([5] * 50, [10] * 50, samples=200)
    assert ci["mIoU"] == pytest.approx((0.5, 0.5)) and ci["oIoU"] == pytest.approx((0.5, 0.5))


def test_bootstrap_is_fast_for_10k_sentences():
    inter, union = _synthetic_counts(10_000, 1)
    start = time.perf_counter()
    metrics.bootstrap_ci(inter, union, samples=1000, seed=0)
    assert time.perf_counter() - start < 5.0  # ~0.1 s here; generous for a shared CI box


def test_paired_bootstrap_sign_and_interval():
    inter, union = _synthetic_counts(2000, 2)
    iou_a = metrics.iou(inter, union)
    better = np.minimum(inter + union // 10, union)  # B gains on every sentence
    iou_b = metrics.iou(better, union)
    r = metrics.paired_bootstrap(iou_a, iou_b, samples=500, seed=0)
    assert r["diff"] == pytest.approx(iou_b.mean() - iou_a.mean())
    assert r["diff"] > 0 and r["ci"][0] > 0
    r_swapped = metrics.paired_bootstrap(iou_b, iou_a, samples=500, seed=0)
    assert r_swapped["diff"] < 0 and r_swapped["ci"][1] < 0
    same = metrics.paired_bootstrap(iou_a, iou_a, samples=200)
    assert same["diff"] == 0.0 and same["ci"] == (0.0, 0.0)

    o = metrics.paired_bootstrap_oiou(inter, union, better, union, samples=500, seed=0)
    assert o["diff"] == pytest.approx(better.sum() / union.sum() - inter.sum() / union.sum())
    assert o["ci"][0] > 0
    with pytest.raises(RefbenchError, match="equal length"):
        metrics.paired_bootstrap(iou_a, iou_b[:-1])


# --------------------------------------------------------------------------- breakdowns


def test_words_and_location_words():
    assert metrics.words("Man on the LEFT-most side!") == ["man", "on", "the", "left", "most", "side"]
    assert metrics.has_location_word("guy second from left")
    assert metrics.has_location_word("the dog next to the cat")
    assert not metrics.has_location_word("red umbrella with white dots")
    assert {"left", "right", "top", "bottom", "middle"} <= metrics.LOCATION_WORDS
    assert metrics.length_bucket("umbrella") == "1-2 words"
    assert metrics.length_bucket("a b c d e f g h i j") == "10+ words"
    assert metrics.length_bucket("...") == "0 words"


def test_breakdowns_hand_case():
    sents = ["man on left", "red car", "the big dog next to a cat", "umbrella"]
    cats = [1, 3, 18, 1]
    inter = [8, 5, 1, 0]
    union = [10, 10, 4, 0]
    b = metrics.breakdowns(sents, cats, inter, union)
    assert b["length"] == {
        "1-2 words": {"n": 2, "mIoU": pytest.approx(0.25), "oIoU": pytest.approx(0.5)},
        "3-4 words": {"n": 1, "mIoU": pytest.approx(0.8), "oIoU": pytest.approx(0.8)},
        "7-9 words": {"n": 1, "mIoU": pytest.approx(0.25), "oIoU": pytest.approx(0.25)},
    }
    assert list(b["category"]) == ["1", "3", "18"]
    assert b["category"]["1"] == {"n": 2, "mIoU": pytest.approx(0.4), "oIoU": pytest.approx(0.8)}
    assert b["location_words"]["with"] == {"n": 2, "mIoU": pytest.approx(0.525), "oIoU": pytest.approx(9 / 14)}
    assert b["location_words"]["without"]["n"] == 2
    with pytest.raises(RefbenchError, match="one sentence and category per I/U pair"):
        metrics.breakdowns(sents[:3], cats, inter, union)
