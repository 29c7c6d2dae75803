"""Scoring: per-sentence intersection/union, mIoU, oIoU, Pr@X, bootstrap intervals, breakdowns.

Pure functions over numpy arrays (torch tensors are accepted by the batched I/U helper, which
then counts on the tensor's device). Nothing here reads files or knows about models.

The unit of scoring is one sentence of one ref (every sentence of every ref, as CRIS and LAVT
do). For each sentence the evaluation loop records two integers:

    I = |pred AND gt|      U = |pred OR gt|      (pixel counts, int64)

and everything else is computed from those integers:

    mIoU   = mean over sentences of I/U          (an empty union, U == 0, counts as IoU 0)
    oIoU   = sum(I) / sum(U)                     ("overall" or "cumulative" IoU)
    Pr@X   = share of sentences with IoU >= X,   X in 0.5, 0.6, 0.7, 0.8, 0.9
             (IoU > X, strictly, under a protocol with `pr_strict`, as CRIS's code counts)

All fractions are in [0, 1]. Pr@X is decided in exact integer arithmetic (10*I >= 7*U for
Pr@0.7, 10*I > 7*U when strict), so an IoU of exactly 0.7 passes Pr@0.7 (or not, when strict)
whatever float rounding would have said. (CRIS's code counts IoU > X strictly, LAVT's IoU >= X;
the two differ only on exact ties.)

How the input is made, where the masks are compared (original image size or network input
size) and the Pr@X rule make the *protocol*; see `PROTOCOLS`. The result record names the
protocol and its version beside every number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from refbench.errors import RefbenchError

# Pr@X thresholds as exact fractions (numerator, denominator): IoU >= num/den <=> den*I >= num*U.
PR_THRESHOLDS: tuple[tuple[int, int], ...] = ((5, 10), (6, 10), (7, 10), (8, 10), (9, 10))
PR_KEYS: tuple[str, ...] = tuple(f"Pr@{num / den:.1f}" for num, den in PR_THRESHOLDS)
METRIC_KEYS: tuple[str, ...] = ("mIoU", "oIoU", *PR_KEYS)  # every float summarize() returns


# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    name: str  # registry key, stored in every result record
    version: int  # bumped whenever the computation changes; records of different versions never share a column
    resolution: str  # where I and U are counted: "original" image pixels or the network "input" pixels
    description: str  # one line, printed beside the numbers
    preprocess: str = "letterbox"  # how the network input is made: "letterbox" (refbench.data.transforms) or "cris" (refbench.data.cvwarp, OpenCV)
    pr_strict: bool = False  # Pr@X counts IoU > X (CRIS's code) instead of IoU >= X


PROTOCOLS: dict[str, Protocol] = {
    "original": Protocol(
        name="original",
        version=1,
        resolution="original",
        description=(
            "I/U at the original image size: the probability map is mapped back (letterbox "
            "undone, resized) and binarised at the model's threshold, as CRIS and EAVL score"
        ),
    ),
    "input": Protocol(
        name="input",
        version=1,
        resolution="input",
        description=(
            "I/U at the network input size: image and GT resized to the input (e.g. 480x480) "
            "and compared there, as LAVT scores"
        ),
    ),
    "cris": Protocol(
        name="cris",
        version=1,
        resolution="original",
        description=(
            "CRIS's evaluation chain end to end, with OpenCV: cv2 decode, cubic affine letterbox "
            "(mean border), sigmoid, bicubic align_corners up to the input, cubic inverse warp "
            "to the original size, > 0.35, IoU per sentence, Pr@X strict (IoU > X)"
        ),
        preprocess="cris",
        pr_strict=True,
    ),
}
DEFAULT_PROTOCOL = "original"


def takes_binary_masks(protocol: Protocol) -> bool:
    """Whether `protocol` can score submitted binary masks (`refbench score`).

    Those that compare at the original image size apply directly to a mask at that size; those
    that compare at the network input need the model's probability map (resized to the input
    before it is binarised), which a submission does not hold.
    """
    return protocol.resolution == "original"


def checkpoint_protocol(ckpt: dict) -> str:
    """The protocol a checkpoint is scored under by default: the one its recipe trained and
    validated with (`cris` for the cris and paper recipes, whose input is CRIS's preprocessing),
    `cris` for a converted CRIS.pytorch checkpoint, else refbench's default (`original`)."""
    recipe = ckpt.get("recipe") if isinstance(ckpt.get("recipe"), dict) else {}
    name = recipe.get("protocol") or ckpt.get("protocol")
    return name if name in PROTOCOLS else DEFAULT_PROTOCOL


def get_protocol(name: str) -> Protocol:
    """The registered protocol `name`; a one-line error naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise RefbenchError(
            f"unknown metric protocol {name!r}; known protocols: {', '.join(PROTOCOLS)}"
        )
    return PROTOCOLS[name]


def binarize(prob: Any, threshold: float) -> Any:
    """The predicted mask: `prob > threshold` (CRIS's rule, e.g. sigmoid(logits) > 0.35).

    Works on numpy arrays and torch tensors alike; the result has the input's shape, dtype bool.
    """
    return prob > threshold


# --------------------------------------------------------------------------- I and U


def intersection_union(pred: Any, gt: Any) -> tuple[int, int]:
    """I and U (pixel counts, Python ints) of two boolean masks of the same shape [H, W]."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    _check_masks(pred, gt)
    pred = pred.astype(bool, copy=False)
    gt = gt.astype(bool, copy=False)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def intersection_union_batch(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """I and U per mask of two stacks of boolean masks: [N, H, W] -> (int64[N], int64[N]).

    numpy arrays and CPU tensors are counted with numpy (one `count_nonzero` per mask: ~100x
    faster on a CPU than torch's reduction over bools); other torch tensors are counted on their
    own device (GPU) and only the 2*N counts are copied back. Nonzero means foreground.
    """
    if _is_torch(pred) or _is_torch(gt):
        return _intersection_union_torch(pred, gt)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    _check_masks(pred, gt, batched=True)
    pred = pred.astype(bool, copy=False)  # [N, H, W]
    gt = gt.astype(bool, copy=False)  # [N, H, W]
    inter = np.fromiter((np.count_nonzero(m) for m in pred & gt), dtype=np.int64, count=pred.shape[0])  # [N]
    union = np.fromiter((np.count_nonzero(m) for m in pred | gt), dtype=np.int64, count=pred.shape[0])  # [N]
    return inter, union


def _intersection_union_torch(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    pred = torch.as_tensor(pred)
    gt = torch.as_tensor(gt, device=pred.device)
    _check_masks(pred, gt, batched=True)
    if pred.device.type == "cpu":
        return intersection_union_batch(pred.bool().numpy(), gt.bool().numpy())
    pred = pred.bool().flatten(1)  # [N, H*W]
    gt = gt.bool().flatten(1)  # [N, H*W]
    inter = (pred & gt).sum(dim=1, dtype=torch.int64)  # [N]
    union = (pred | gt).sum(dim=1, dtype=torch.int64)  # [N]
    return inter.cpu().numpy(), union.cpu().numpy()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check_masks(pred: Any, gt: Any, batched: bool = False) -> None:
    if tuple(pred.shape) != tuple(gt.shape):
        raise RefbenchError(
            f"prediction and GT masks differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}"
        )
    want = 3 if batched else 2
    if len(pred.shape) != want:
        raise RefbenchError(
            f"expected {'a stack of masks [N, H, W]' if batched else 'a mask [H, W]'}, "
            f"got shape {tuple(pred.shape)}"
        )


# --------------------------------------------------------------------------- summaries


def as_counts(intersections: Any, unions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-sentence I and U: equal-length 1-D non-negative integers with I <= U.

    Returns them as int64 arrays. Raises `RefbenchError` (one line) on empty or bad input.
    """
    inter = np.asarray(intersections)
    union = np.asarray(unions)
    if inter.ndim != 1 or union.ndim != 1 or inter.shape != union.shape:
        raise RefbenchError(
            f"I and U must be 1-D arrays of the same length, got shapes {inter.shape} and {union.shape}"
        )
    if inter.size == 0:
        raise RefbenchError("no sentences to score: I and U are empty")
    for name, a in (("I", inter), ("U", union)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise RefbenchError(f"{name} must hold integer pixel counts, got dtype {a.dtype}")
    inter = inter.astype(np.int64)
    union = union.astype(np.int64)
    if (inter < 0).any() or (union < 0).any():
        raise RefbenchError("I and U must be non-negative pixel counts")
    bad = np.flatnonzero(inter > union)
    if bad.size:
        raise RefbenchError(
            f"intersection larger than union for {bad.size} sentence(s), first at index {bad[0]} "
            f"(I={inter[bad[0]]}, U={union[bad[0]]})"
        )
    return inter, union


def iou(intersections: Any, unions: Any) -> np.ndarray:
    """Per-sentence IoU = I/U as float64, 0 where the union is empty."""
    inter, union = as_counts(intersections, unions)
    return _iou(inter, union)


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    out = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _oiou(inter_sum: Any, union_sum: Any) -> Any:
    """sum I / sum U elementwise, 0 where sum U is 0."""
    inter_sum = np.asarray(inter_sum, dtype=np.float64)
    union_sum = np.asarray(union_sum, dtype=np.float64)
    out = np.zeros(np.broadcast(inter_sum, union_sum).shape, dtype=np.float64)
    np.divide(inter_sum, union_sum, out=out, where=union_sum > 0)
    return out


def _precision_at(inter: np.ndarray, union: np.ndarray, strict: bool = False) -> dict[str, float]:
    nonempty = union > 0  # an empty union is IoU 0: it never passes
    passes = np.greater if strict else np.greater_equal
    return {
        key: float(np.count_nonzero(nonempty & passes(den * inter, num * union)) / inter.size)
        for key, (num, den) in zip(PR_KEYS, PR_THRESHOLDS)
    }


def summarize(intersections: Any, unions: Any, strict: bool = False) -> dict[str, Any]:
    """Headline metrics of per-sentence I/U counts.

    Returns {"n": sentences, "mIoU", "oIoU", "Pr@0.5", ..., "Pr@0.9"}: floats in [0, 1]; Pr@X
    counts IoU > X when `strict` (a protocol's `pr_strict`), IoU >= X otherwise.
    Raises `RefbenchError` on empty input (never NaN).
    """
    inter, union = as_counts(intersections, unions)
    return {
        "n": int(inter.size),
        "mIoU": float(_iou(inter, union).mean()),
        "oIoU": float(_oiou(inter.sum(), union.sum())),
        **_precision_at(inter, union, strict),
    }


def summarize_protocol(intersections: Any, unions: Any, protocol: str) -> dict[str, Any]:
    """`summarize` with the Pr@X rule of the named protocol (unknown names: IoU >= X)."""
    proto = PROTOCOLS.get(protocol)
    return summarize(intersections, unions, strict=bool(proto and proto.pr_strict))


# --------------------------------------------------------------------------- bootstrap

_BOOTSTRAP_CHUNK = 64  # resamples drawn at once: 64 x n indices (5 MiB for n = 10k)


def _resamples(n: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index matrices [chunk, n] (sentences drawn with replacement), seeded."""
    if samples < 1:
        raise RefbenchError(f"bootstrap needs at least 1 resample, got {samples}")
    rng = np.random.default_rng(seed)
    done = 0
    while done < samples:
        k = min(_BOOTSTRAP_CHUNK, samples - done)
        yield rng.integers(0, n, size=(k, n))  # [k, n]
        done += k


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise RefbenchError(f"confidence level must be in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    intersections: Any, unions: Any, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over sentences: {"mIoU": (lo, hi), "oIoU": (lo, hi)}.

    Each resample draws n sentences with replacement (seeded by `seed`, so the same input and
    seed give the same interval). Vectorised: 1000 resamples of 10k sentences take well under
    a second.
    """
    inter, union = as_counts(intersections, unions)
    ious = _iou(inter, union)
    miou, oiou = [], []
    for idx in _resamples(inter.size, samples, seed):
        miou.append(ious[idx].mean(axis=1))  # [k]
        oiou.append(_oiou(inter[idx].sum(axis=1), union[idx].sum(axis=1)))  # [k]
    return {
        "mIoU": _interval(np.concatenate(miou), level),
        "oIoU": _interval(np.concatenate(oiou), level),
    }


def paired_bootstrap(
    iou_a: Any, iou_b: Any, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Paired bootstrap of mean IoU, B - A, over the same sentences in the same order.

    `iou_a[i]` and `iou_b[i]` must be the same sentence. Returns {"a", "b", "diff" (= b - a),
    "ci": (lo, hi) of the difference, "samples", "seed", "level"}.
    """
    a = np.asarray(iou_a, dtype=np.float64)
    b = np.asarray(iou_b, dtype=np.float64)
    _check_paired(a, b)
    diff = b - a  # [n]
    stats = np.concatenate([diff[idx].mean(axis=1) for idx in _resamples(a.size, samples, seed)])
    return _paired_result(float(a.mean()), float(b.mean()), stats, samples, seed, level)


def paired_bootstrap_oiou(
    i_a: Any, u_a: Any, i_b: Any, u_b: Any, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Paired bootstrap of overall IoU (sum I / sum U), B - A; same sentences, same order.

    Same return shape as `paired_bootstrap`. With the same `seed` and `samples` it draws the
    same resamples as `paired_bootstrap`, so the two intervals describe the same replicates.
    """
    ia, ua = as_counts(i_a, u_a)
    ib, ub = as_counts(i_b, u_b)
    _check_paired(ia, ib)
    stats = np.concatenate(
        [
            _oiou(ib[idx].sum(1), ub[idx].sum(1)) - _oiou(ia[idx].sum(1), ua[idx].sum(1))
            for idx in _resamples(ia.size, samples, seed)
        ]
    )
    a, b = float(_oiou(ia.sum(), ua.sum())), float(_oiou(ib.sum(), ub.sum()))
    return _paired_result(a, b, stats, samples, seed, level)


def _check_paired(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 1 or a.shape != b.shape:
        raise RefbenchError(f"paired values must be 1-D of equal length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise RefbenchError("no sentences to compare")


def _paired_result(a: float, b: float, stats: np.ndarray, samples: int, seed: int, level: float) -> dict[str, Any]:
    return {
        "a": a,
        "b": b,
        "diff": b - a,
        "ci": _interval(stats, level),
        "samples": samples,
        "seed": seed,
        "level": level,
    }


# --------------------------------------------------------------------------- breakdowns

# Words that place the referent by position rather than appearance. RefCOCO+ forbade such
# words; a model that reads them well gains on RefCOCO and G-Ref only. Matched as whole
# lower-case words (so "left-most" counts through "left", "leftmost" is listed itself).
LOCATION_WORDS: frozenset[str] = frozenset(
    """
    left right leftmost rightmost top bottom topmost middle center centre central
    front behind back above below under underneath beneath over upper lower
    near nearest closest close far farthest furthest corner side beside between next
    """.split()
)

# Sentence length buckets in words, as data: (label, lowest, highest or None for no bound).
LENGTH_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("1-2 words", 1, 2),
    ("3-4 words", 3, 4),
    ("5-6 words", 5, 6),
    ("7-9 words", 7, 9),
    ("10+ words", 10, None),
)

_WORD = re.compile(r"[a-z0-9]+")


def words(sentence: str) -> list[str]:
    """Lower-case alphanumeric words of a sentence (punctuation and hyphens split words)."""
    return _WORD.findall(sentence.lower())


def has_location_word(sentence: str) -> bool:
    """Whether the sentence uses a word of `LOCATION_WORDS`."""
    return any(w in LOCATION_WORDS for w in words(sentence))


def length_bucket(sentence: str) -> str:
    """The `LENGTH_BUCKETS` label of a sentence's word count ("0 words" if it has none)."""
    n = len(words(sentence))
    for label, lo, hi in LENGTH_BUCKETS:
        if n >= lo and (hi is None or n <= hi):
            return label
    return "0 words"


def breakdowns(
    sentences: Sequence[str],
    category_ids: Sequence[int],
    intersections: Any,
    unions: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """mIoU/oIoU of groups of sentences: by length bucket, by category, by location words.

    Returns {"length": {"1-2 words": {"n", "mIoU", "oIoU"}, ...},
             "category": {"<category_id>": {...}, ...},
             "location_words": {"with": {...}, "without": {...}}}.
    Empty groups are left out. Category keys are strings (JSON object keys).
    """
    inter, union = as_counts(intersections, unions)
    if not (len(sentences) == len(category_ids) == inter.size):
        raise RefbenchError(
            f"breakdowns need one sentence and category per I/U pair: got {len(sentences)} "
            f"sentences, {len(category_ids)} categories, {inter.size} I/U pairs"
        )
    length_labels = [length_bucket(s) for s in sentences]
    location = ["with" if has_location_word(s) else "without" for s in sentences]
    categories = [str(int(c)) for c in category_ids]
    length_order = [label for label, _, _ in LENGTH_BUCKETS] + ["0 words"]
    return {
        "length": _group_summaries(length_labels, inter, union, order=length_order),
        "category": _group_summaries(categories, inter, union, order=sorted(set(categories), key=int)),
        "location_words": _group_summaries(location, inter, union, order=["with", "without"]),
    }


def _group_summaries(
    labels: Sequence[str], inter: np.ndarray, union: np.ndarray, order: Iterable[str]
) -> dict[str, dict[str, float]]:
    labels_arr = np.asarray(labels, dtype=object)
    out: dict[str, dict[str, float]] = {}
    for label in order:
        sel = labels_arr == label
        if not sel.any():
            continue
        i, u = inter[sel], union[sel]
        out[label] = {
            "n": int(sel.sum()),
            "mIoU": float(_iou(i, u).mean()),
            "oIoU": float(_oiou(i.sum(), u.sum())),
        }
    return out

