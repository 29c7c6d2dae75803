"""`refbench bench score`: the neutral scorer against merely decoding the submitted masks.

A synthetic submission the size of RefCOCO testB (5,095 sentences, ~2 per ref) at COCO image
sizes (640 x 480, 480 x 640, 640 x 427, 500 x 375, ...): GT masks are random star-shaped
polygons covering 2-40% of the image, rasterised by pycocotools like COCO's annotations; each
prediction is its GT polygon jittered and shifted (some are another ref's mask, a few empty),
written as the RLE JSONL of `refbench score`. Measured, interleaved, medians of ratios:

- ours: `score.read_submission` + `score.match` (every check: ids, sizes, RLE runs covering
  H x W) + `score.count_iu` (I and U on the RLEs), from the file to per-sentence I/U;
- decode-only (the target's baseline): read the same file, parse each line, and
  `pycocotools.mask.decode` each predicted RLE, nothing else;
- decode-and-count (information): what a scorer over decoded masks does, decoding prediction
  and GT and counting I and U with numpy;
- publish (information): ours plus writing the result record (1000-resample bootstrap,
  breakdowns, parquet sidecar), the rest of `refbench score` once the GT is read.
Reading the GT from the shards is not in these timings (it is the same for every scorer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from refbench.bench.common import BenchSettings, interleaved, median_ratio, row
from refbench.eval import results, score

SENTENCES = 5095  # RefCOCO testB
SENTENCES_PER_REF = 2  # testB: 5,095 sentences of 1,810 refs (2.8); 2 keeps more distinct masks
COCO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 512), (612, 612), (640, 360))  # (w, h)
SCORE_TARGET = 1.5  # scoring <= 1.5 x the time to decode the submitted masks
REPS, WARMUP = 3, 1
WORDS = ("man", "woman", "left", "right", "red", "shirt", "car", "the", "on", "middle", "dog", "white")


def _polygon(rng: np.random.Generator, w: int, h: int, cx: float, cy: float, r: float, jitter: float = 0.0) -> list[float]:
    n = int(rng.integers(12, 40))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.55, 1.0, n) * (1 + rng.uniform(-jitter, jitter, n))
    xs = np.clip(cx + radii * np.cos(angles), 0, w - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, h - 1)
    return np.stack([xs, ys], 1).ravel().tolist()


def submission(folder: Path, sentences: int = SENTENCES, seed: int = 0):
    """Write `folder/submission.jsonl`; returns (its path, the matching score.Truth)."""
    rng = np.random.default_rng(seed)
    truth = score.Truth()
    lines = []
    refs = (sentences + SENTENCES_PER_REF - 1) // SENTENCES_PER_REF
    gts = []
    for ref in range(refs):
        w, h = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
        r = min(w, h) * float(rng.uniform(0.1, 0.45))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        gt = mask_utils.merge(mask_utils.frPyObjects([_polygon(rng, w, h, cx, cy, r)], h, w))
        gts.append((w, h, cx, cy, r, gt))
    for sid in range(sentences):
        ref = sid // SENTENCES_PER_REF
        w, h, cx, cy, r, gt = gts[ref]
        kind = rng.random()
        if kind < 0.02:
            pred = score.encode_mask(np.zeros((h, w), np.uint8))
        elif kind < 0.12:  # another object of a same-size image
            pw, ph, pcx, pcy, pr, _ = next(g for g in gts[ref + 1:] + gts[:ref + 1] if g[:2] == (w, h))
            pred = mask_utils.merge(mask_utils.frPyObjects([_polygon(rng, w, h, pcx, pcy, pr)], h, w))
        else:
            dx, dy = rng.normal(0, r * 0.1, 2)
            pred = mask_utils.merge(mask_utils.frPyObjects([_polygon(rng, w, h, cx + dx, cy + dy, r, 0.15)], h, w))
        lines.append(score.rle_line(sid, pred))
        truth.sent_id.append(sid)
        truth.ref_id.append(ref)
        truth.ann_id.append(ref)
        truth.image_id.append(ref)
        truth.file_name.append(f"COCO_train2014_{ref:012d}.jpg")
        truth.height.append(h)
        truth.width.append(w)
        truth.category_id.append(int(rng.integers(1, 91)))
        text = " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
        truth.sentence.append(text)
        truth.sent.append(text)
        truth.rle.append(gt)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "submission.jsonl"
    path.write_text("".join(lines))
    return path, truth


def bench_score(s: BenchSettings) -> list[dict]:
    """Rows: ours vs decode-only (target), sentences/s vs decode-and-count, publishing (information)."""
    path, truth = submission(Path(s.workdir) / "score")
    n = len(truth)
    pixels = float(np.mean(np.asarray(truth.height) * np.asarray(truth.width)))
    out_root = Path(s.workdir) / "score" / "results"

    def ours() -> float:
        t0 = time.perf_counter()
        rles = score.match(score.read_submission(path), truth)
        score.count_iu(rles, truth.rle)
        return time.perf_counter() - t0

    def decode_only() -> float:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            for line in f:
                rle = json.loads(line)["rle"]
                mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        return time.perf_counter() - t0

    def decode_and_count() -> float:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            for line, gt in zip(f, truth.rle):
                rle = json.loads(line)["rle"]
                p = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
                g = mask_utils.decode(gt)
                np.count_nonzero(p & g), np.count_nonzero(p | g)
        return time.perf_counter() - t0

    def publish() -> float:
        t0 = time.perf_counter()
        sub = score.read_submission(path)
        i, u = score.count_iu(score.match(sub, truth), truth.rle)
        results.write_record(
            out_root, dataset="bench_score", split="testB", protocol="original", threshold=None,
            model=results.ModelInfo(name="bench", variant="synthetic", run="submitted"),
            data=results.DataInfo(manifest_sha256="0" * 64, sentences_expected=n, synthetic=True),
            sentences={"sent_id": truth.sent_id, "ref_id": truth.ref_id, "image_id": truth.image_id,
                       "category_id": truth.category_id, "sent": truth.sent, "I": i, "U": u},
            command="refbench bench score", source="submitted",
            submission={"file": str(path), "format": sub.format, "sha256": sub.sha256, "entries": n, "note": ""},
        )
        return time.perf_counter() - t0

    times = interleaved({"ours": ours, "decode": decode_only, "naive": decode_and_count, "publish": publish},
                        REPS, WARMUP)
    med = {k: float(np.median(v)) for k, v in times.items()}
    setting = f"{n:,} sentences, COCO-size masks (mean {pixels / 1e3:.0f} k pixels), RLE JSONL, synthetic"
    return [
        row("score", f"s to score a submission: parse + validate + I/U on RLEs ({setting})",
            med["ours"], med["decode"], SCORE_TARGET, median_ratio(times["ours"], times["decode"]),
            baseline_is="read + parse the same file and pycocotools mask.decode every predicted mask, nothing else"),
        row("score", f"sentences/s scored, from the file to per-sentence I/U ({setting})",
            n / med["ours"], n / med["naive"], None, median_ratio(times["naive"], times["ours"]),
            baseline_is="a decode-and-count scorer: mask.decode prediction and GT, numpy I and U"),
        row("score", f"s to score and publish the record (bootstrap 1000, breakdowns, parquet; {setting})",
            med["publish"], med["decode"], None, median_ratio(times["publish"], times["decode"]),
            baseline_is="decode-only, as in the first row"),
    ]
