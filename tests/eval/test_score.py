"""The neutral scorer: `refbench sentences`, `refbench score` and `refbench predictions`.

Most cases run on the hand-written tiny dataset (tests/_tiny_shards.py), whose GT masks are
known; the round trip predictions -> score = eval uses the seeded-init checkpoint `init_run`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _harness import DATASET, assert_cli_ok, assert_ok, assert_one_line_error, cli, torchrun
from _tiny_shards import write_tiny_dataset
from PIL import Image
from pycocotools import mask as mask_utils

from refbench.data import shards as data
from refbench.errors import RefbenchError
from refbench.eval import evaluate, metrics, results
from refbench.eval import rle as rlecheck
from refbench.eval import score
from refbench.report import leaderboard

SPLIT = "val"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(shard root, truth, GT masks by sent_id, image size by sent_id) of a tiny val split."""
    root = tmp_path_factory.mktemp("tiny")
    _, truth = write_tiny_dataset(root, images={"train": 1, SPLIT: 6}, shard_size=2)
    gt = score.ground_truth(root / DATASET, split=SPLIT)
    masks = {sid: mask_utils.decode(rle) for sid, rle in zip(gt.sent_id, gt.rle)}
    return root, truth, gt, masks


def _rle_file(path: Path, masks: dict[int, np.ndarray], gz: bool = False) -> Path:
    lines = [score.rle_line(sid, score.encode_mask(m)) for sid, m in masks.items()]
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _png_folder(path: Path, masks: dict[int, np.ndarray]) -> Path:
    path.mkdir()
    for sid, m in masks.items():
        Image.fromarray((m != 0).astype(np.uint8) * 255).save(path / f"{sid}.png")
    return path


def _perturbed(masks: dict[int, np.ndarray], seed: int = 0) -> dict[int, np.ndarray]:
    """Shifted, eroded, empty, full and random masks: every kind of I/U a submission can have."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, (sid, m) in enumerate(masks.items()):
        kind = k % 5
        if kind == 0:
            p = np.roll(m, (int(rng.integers(-5, 6)), int(rng.integers(-5, 6))), axis=(0, 1))
        elif kind == 1:
            p = m.copy()
            p[: m.shape[0] // 2] = 0
        elif kind == 2:
            p = np.zeros_like(m)
        elif kind == 3:
            p = np.ones_like(m)
        else:
            p = (rng.random(m.shape) < 0.4).astype(np.uint8)
        out[sid] = p.astype(np.uint8)
    return out


def _score(tiny, predictions_path, results_root, **kw):
    root = tiny[0]
    return score.score_submission(predictions_path, dataset=DATASET, split=SPLIT, method=kw.pop("method", "mine"),
                                  shards=root, results=results_root, **kw)


# --------------------------------------------------------------------------- RLE parsing


def test_rle_counts_equal_pycocotools_runs():
    rng = np.random.default_rng(0)
    cases = [np.zeros((7, 5), np.uint8), np.ones((640, 480), np.uint8), (rng.random((333, 500)) < 0.5).astype(np.uint8)]
    big = np.zeros((1000, 1000), np.uint8)
    big[100:900, 5:995] = 1  # long runs: multi-character numbers, negative differences
    cases.append(big)
    for _ in range(20):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        cases.append((rng.random((h, w)) < rng.random()).astype(np.uint8))
    for m in cases:
        rle = mask_utils.encode(np.asfortranarray(m))
        runs = rlecheck.rle_counts(rle["counts"])
        assert runs.sum() == m.size and (runs >= 0).all()
        flat = np.repeat(np.arange(runs.size) % 2, runs).astype(np.uint8)  # column-major pixels
        np.testing.assert_array_equal(flat.reshape(m.shape[::-1]).T, m)
        rlecheck.check_rle(rle["counts"], *m.shape)


@pytest.mark.parametrize("counts", ["", "\x7f", "0?", "PP", "c1"])
def test_bad_rle_counts_are_refused(counts):
    with pytest.raises(ValueError):
        rlecheck.check_rle(counts, 4, 4)


def test_count_iu_on_rles_equals_counting_pixels():
    rng = np.random.default_rng(1)
    pred, gt, want_i, want_u = [], [], [], []
    for _ in range(600):  # more than 255: pycocotools' mask.area fails on longer lists, count_iu chunks them
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        a, b = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
        pred.append(mask_utils.encode(np.asfortranarray(a, dtype=np.uint8)))
        gt.append(mask_utils.encode(np.asfortranarray(b, dtype=np.uint8)))
        i, u = metrics.intersection_union(a, b)
        want_i.append(i)
        want_u.append(u)
    i, u = score.count_iu(pred, gt)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(u, want_u)


# --------------------------------------------------------------------------- sentences


def test_sentences_lists_every_sentence_in_shard_order(tiny, tmp_path):
    root, truth, _, _ = tiny
    result = cli("sentences", "--dataset", DATASET, "--split", SPLIT, "--shards", root)
    assert_cli_ok(result)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["sent_id"] for r in rows] == truth.sentences[SPLIT]
    assert all(list(r) == list(score.SENTENCE_FIELDS) for r in rows)
    first = rows[0]
    assert first["file_name"] == f"COCO_train2014_{first['image_id']:012d}.jpg"
    assert first["sentence"].isupper() and first["ann_id"] == 50000 + first["ref_id"]  # raw text, the ann_id
    h, w = truth.masks[first["ref_id"]].shape
    assert (first["height"], first["width"]) == (h, w)

    out = tmp_path / "s.jsonl.gz"
    assert_cli_ok(cli("sentences", "--dataset", DATASET, "--split", SPLIT, "--shards", root, "--out", out))
    assert gzip.decompress(out.read_bytes()).decode() == result.stdout


# --------------------------------------------------------------------------- scoring


def test_perfect_submission_scores_one_on_every_metric(tiny, tmp_path):
    _, _, _, masks = tiny
    out = _score(tiny, _rle_file(tmp_path / "gt.jsonl", masks), tmp_path / "results")
    rec = results.load_record(out.record)
    assert rec.metrics["n"] == len(masks)
    for key in metrics.METRIC_KEYS:
        assert rec.metrics[key] == 1.0, key
    assert rec.source == "submitted" and rec.protocol["threshold"] is None
    assert rec.submission["sha256"] == results.fsutil.sha256_file(tmp_path / "gt.jsonl")
    assert rec.submission["format"] == "rle-jsonl" and rec.submission["entries"] == len(masks)


def test_perturbed_submission_equals_an_independent_computation(tiny, tmp_path):
    root, truth, gt, masks = tiny
    pred = _perturbed(masks)
    out = _score(tiny, _rle_file(tmp_path / "p.jsonl.gz", pred, gz=True), tmp_path / "results",
                 variant="r50", note="perturbed GT")
    rec = results.load_record(out.record)
    # independent: numpy on decoded masks, refs' masks from the dataset writer
    ref_of = dict(zip(gt.sent_id, gt.ref_id))
    sids = sorted(masks)
    inter = [int(np.count_nonzero((pred[s] != 0) & (truth.masks[ref_of[s]] != 0))) for s in sids]
    union = [int(np.count_nonzero((pred[s] != 0) | (truth.masks[ref_of[s]] != 0))) for s in sids]
    side = rec.sentences.sort("sent_id")
    assert side["sent_id"].to_list() == sids
    assert side["I"].to_list() == inter and side["U"].to_list() == union
    want = metrics.summarize(inter, union)
    assert 0.0 < want["mIoU"] < 1.0
    for key, value in want.items():
        assert rec.metrics[key] == value
    assert rec.model["name"] == "mine" and rec.model["variant"] == "r50"
    assert rec.submission["note"] == "perturbed GT" and rec.meta["data"]["manifest_sha256"] == results.fsutil.sha256_file(
        root / DATASET / "manifest.json")


def test_png_folder_png_jsonl_and_rle_jsonl_give_identical_records(tiny, tmp_path):
    _, _, _, masks = tiny
    pred = _perturbed(masks, seed=3)
    recs = []
    rle = _score(tiny, _rle_file(tmp_path / "p.jsonl", pred), tmp_path / "r1")
    folder = _png_folder(tmp_path / "pngs", pred)
    png = _score(tiny, folder, tmp_path / "r2")
    lines = "".join(score.iter_png_lines((sid, f"pngs/{sid}.png") for sid in pred))
    (tmp_path / "png.jsonl").write_text(lines)
    png_jsonl = _score(tiny, tmp_path / "png.jsonl", tmp_path / "r3")
    for out in (rle, png, png_jsonl):
        recs.append(results.load_record(out.record))
    assert [r.submission["format"] for r in recs] == ["rle-jsonl", "png-folder", "png-jsonl"]
    for r in recs[1:]:
        assert r.sentences.equals(recs[0].sentences)
        assert r.metrics == recs[0].metrics and r.meta["breakdowns"] == recs[0].meta["breakdowns"]


def test_score_cli_prints_the_metrics_and_the_leaderboard_shows_a_submitted_row(tiny, tmp_path):
    root, _, _, masks = tiny
    sub = _rle_file(tmp_path / "p.jsonl", _perturbed(masks))
    res = tmp_path / "results"
    result = cli("score", sub, "--dataset", DATASET, "--split", SPLIT, "--shards", root, "--method", "LAVT",
                 "--variant", "swin-b", "--results", res, "--note", "exported by hand")
    assert_cli_ok(result)
    assert "submitted LAVT/swin-b" in result.output and "protocol original" in result.output and "mIoU" in result.output
    table = leaderboard.build_table(res, dataset=DATASET)
    row = table.filter(pl.col("method") == "LAVT").row(0, named=True)
    assert row["source"] == "submitted" and row["variant"] == "swin-b"
    assert results.fsutil.sha256_file(sub) in row["note"] and "exported by hand" in row["note"]
    # compare works on a submitted record unchanged
    other = _score(tiny, _rle_file(tmp_path / "gt.jsonl", masks), res, method="oracle")
    first = next(p for p in (res / DATASET / SPLIT).glob("LAVT-*.json"))
    out = results.compare_records(results.load_record(first), results.load_record(other.record), samples=200)
    assert out["n"] == len(masks) and out["mIoU"]["b"] == 1.0


def test_cris_protocol_scores_a_submission_with_strict_pr(tiny, tmp_path):
    _, _, _, masks = tiny
    pred = dict(masks)
    first, second = list(masks)[:2]
    m = masks[first].astype(bool)
    half = m.copy()
    half[tuple(np.argwhere(m)[: int(m.sum()) // 2].T)] = False  # keeps ceil(n/2) of n pixels: IoU exactly 0.5 for an even n
    pred[first] = half.astype(np.uint8)
    sub = _rle_file(tmp_path / "p.jsonl", pred)
    a = results.load_record(_score(tiny, sub, tmp_path / "r", protocol="original").record)
    b = results.load_record(_score(tiny, sub, tmp_path / "r", protocol="cris").record)
    assert a.sentences["I"].equals(b.sentences["I"]) and a.sentences["U"].equals(b.sentences["U"])
    assert b.protocol["name"] == "cris" and b.protocol["pr_strict"] is True
    i, u = b.sentences["I"].to_numpy(), b.sentences["U"].to_numpy()
    for key, value in metrics.summarize(i, u, strict=True).items():
        assert b.metrics[key] == value
    assert b.metrics["Pr@0.9"] < 1.0 and a.metrics["mIoU"] == b.metrics["mIoU"]
    if int(m.sum()) % 2 == 0:  # an exact IoU of 0.5 passes Pr@0.5 under >= only
        assert a.metrics["Pr@0.5"] > b.metrics["Pr@0.5"]


def test_input_protocol_refuses_a_submission(tiny, tmp_path):
    root, _, _, masks = tiny
    sub = _rle_file(tmp_path / "p.jsonl", masks)
    result = cli("score", sub, "--dataset", DATASET, "--split", SPLIT, "--shards", root, "--method", "m",
                 "--protocol", "input", "--results", tmp_path / "res")
    assert_one_line_error(result, "protocol 'input'", "probability map", "original")
    assert not (tmp_path / "res").exists()


# --------------------------------------------------------------------------- bad submissions


def _lines(masks):
    return [score.rle_line(sid, score.encode_mask(m)) for sid, m in masks.items()]


def _bad_cases(masks):
    """name -> (write(tmp_path) -> submission path, needles of the error line)."""
    sids = list(masks)
    first = sids[0]

    def text(lines):
        def write(tmp):
            (tmp / "bad.jsonl").write_text("".join(lines))
            return tmp / "bad.jsonl"
        return write

    good = _lines(masks)
    h, w = masks[first].shape
    wrong_size = score.rle_line(first, score.encode_mask(np.zeros((h + 1, w), np.uint8)))
    short = json.loads(good[0])
    short["rle"]["counts"] = short["rle"]["counts"][:-1] + "0"  # runs no longer cover H x W
    as_list = {"sent_id": first, "rle": {"size": [h, w], "counts": [h * w]}}

    def png_folder(kind):
        def write(tmp):
            folder = _png_folder(tmp / "pngs", masks)
            if kind == "size":
                Image.fromarray(np.zeros((h, w + 2), np.uint8)).save(folder / f"{first}.png")
            elif kind == "broken":
                (folder / f"{first}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            elif kind == "name":
                (folder / "mask-7.png").write_bytes(b"")
            elif kind == "unknown":
                Image.fromarray(np.zeros((3, 3), np.uint8)).save(folder / "999999.png")
            return folder
        return write

    return {
        "not json": (text([good[0], "{not json\n", *good[1:]]), ["not valid JSON", "line 2", f"of {len(good) + 1}"]),
        "missing": (text(good[1:]), [f"1 of {len(good)} sentences of the split have no mask", f"sent_id {first}"]),
        "unknown": (text([*good, score.rle_line(999999, json.loads(good[0])["rle"])]), ["not in this split", "999999"]),
        "duplicate": (text([*good, good[0]]), ["repeat a sent_id", f"sent_id {first}"]),
        "wrong size": (text([wrong_size, *good[1:]]), ["size is not its image's", f"[{h + 1}, {w}] vs [{h}, {w}]"]),
        "bad rle": (text([json.dumps(short) + "\n", *good[1:]]), ["RLE that does not decode", f"sent_id {first}"]),
        "counts list": (text([json.dumps(as_list) + "\n", *good[1:]]), ["not a string", "line 1"]),
        "no sent_id": (text([good[0].replace('"sent_id"', '"id"'), *good[1:]]), ["lack an integer sent_id", "line 1"]),
        "empty": (text([]), ["holds no entries"]),
        "no file": (lambda tmp: tmp / "nothing.jsonl", ["does not exist"]),
        "png size": (png_folder("size"), ["size is not its image's", f"{first}.png"]),
        "png broken": (png_folder("broken"), ["PNG that does not decode", f"{first}.png"]),
        "png name": (png_folder("name"), ["<sent_id>.png", "mask-7.png"]),
        "png unknown": (png_folder("unknown"), ["not in this split", "999999.png"]),
    }


BAD = ["not json", "missing", "unknown", "duplicate", "wrong size", "bad rle", "counts list", "no sent_id", "empty",
       "no file", "png size", "png broken", "png name", "png unknown"]


@pytest.mark.parametrize("case", BAD)
def test_bad_submission_is_refused_with_one_line_and_nothing_written(tiny, tmp_path, case):
    root, _, _, masks = tiny
    write, needles = _bad_cases(masks)[case]
    sub = write(tmp_path)
    res = tmp_path / "results"
    result = cli("score", sub, "--dataset", DATASET, "--split", SPLIT, "--shards", root, "--method", "m",
                 "--results", res)
    assert_one_line_error(result, *needles)
    assert not res.exists() or not any(res.rglob("*")), list(res.rglob("*"))


def test_problems_name_the_first_few_offenders_and_count_the_rest(tiny, tmp_path):
    _, _, _, masks = tiny
    good = _lines(masks)
    (tmp_path / "b.jsonl").write_text("".join(good[: len(good) - 7]))  # 7 missing, plus a duplicate
    (tmp_path / "b.jsonl").open("a").write(good[0])
    with pytest.raises(RefbenchError) as e:
        _score(tiny, tmp_path / "b.jsonl", tmp_path / "res")
    msg, hint = e.value.message, e.value.hint
    assert "1 of" in msg and "repeat a sent_id" in msg  # the first kind of problem met
    assert "also: 7 sentences have no mask" in hint


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("protocol", ["original", "cris"])
def test_predictions_then_score_equals_eval(init_run, shards_root, tmp_path, one_torch_thread, protocol):
    ckpt = init_run / "best.pt"
    done = evaluate.evaluate_checkpoint(ckpt, splits=["testB"], shards=shards_root, workers=0, protocol=protocol,
                                        results=tmp_path / "eval")
    evaluated = results.load_record(done[0].path)
    sub = tmp_path / "pred.jsonl.gz"
    result = cli("predictions", "--checkpoint", ckpt, "--split", "testB", "--shards", shards_root, "--out", sub,
                 "--workers", "0", "--protocol", protocol)
    assert_cli_ok(result)
    assert "original image size" in result.output and f"protocol {protocol}" in result.output
    out = score.score_submission(sub, dataset=DATASET, split="testB", method="eavl", variant="tiny",
                                 shards=shards_root, results=tmp_path / "scored", protocol=protocol)
    scored = results.load_record(out.record)
    a = evaluated.sentences.sort("sent_id")
    b = scored.sentences.sort("sent_id")
    assert a.equals(b)
    assert 0 < evaluated.metrics["mIoU"] < 1
    for key in metrics.METRIC_KEYS:
        assert scored.metrics[key] == evaluated.metrics[key]
    order = [json.loads(line)["sent_id"] for line in gzip.decompress(sub.read_bytes()).splitlines()]
    assert order == score.ground_truth(shards_root / DATASET, split="testB").sent_id


def test_torchrun_predictions_write_the_single_process_file(init_run, shards_root, tmp_path, one_torch_thread):
    """`refbench predictions` under torchrun (2 gloo ranks x 2 loader workers) on testB, a split
    of ONE shard here: both ranks predict (the split is cut inside the shard) and rank 0 writes
    one complete file, byte for byte the single-process one (batch 1: a forward's rounding
    depends on its batch mates, which differ between the two)."""
    manifest = data.load_manifest(shards_root / DATASET)
    assert manifest["splits"]["testB"]["shards"] == 1
    n = manifest["splits"]["testB"]["sentences"]
    args = ("predictions", "--checkpoint", init_run / "best.pt", "--split", "testB", "--shards", shards_root,
            "--batch-size", "1")
    out = tmp_path / "out"
    out.mkdir()
    single, ddp = out / "single.jsonl", out / "ddp.jsonl"
    assert_cli_ok(cli(*args, "--out", single, "--workers", "0"))
    proc = torchrun(2, *args, "--out", ddp, "--workers", "2")
    assert_ok(proc)
    assert f"{n} masks of {DATASET}/testB" in proc.stdout and f"predicted by 2 ranks: {n // 2} + {n - n // 2}" in proc.stdout
    assert proc.stdout.count(" masks of ") == 1  # rank 0 alone reports (and writes)
    assert len(single.read_text().splitlines()) == n
    assert ddp.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["ddp.jsonl", "single.jsonl"]  # nothing else left behind


def test_batched_rle_check_agrees_with_the_per_string_check():
    """`rles_ok` (one vectorised pass over every string, as `match` runs it) says exactly what
    `check_rle` says of each string: truncated, stray bytes, extra runs, empty, wrong area."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    counts, areas, expected = [], [], []
    for _ in range(2000):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        c = mask_utils.encode(np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8)))["counts"]
        r = rng.random()
        if r < 0.1:
            c = c[:-1]
        elif r < 0.2:
            b = bytearray(c)
            b[int(rng.integers(len(b)))] = int(rng.integers(0, 256))
            c = bytes(b)
        elif r < 0.25:
            c = c + c[-1:]
        elif r < 0.27:
            c = b""
        elif r < 0.3:
            h += 1
        try:
            rlecheck.check_rle(c, h, w)
            expected.append(True)
        except ValueError:
            expected.append(False)
        counts.append(c)
        areas.append(h * w)
    # hand-made edge cases: a 13-character number, negative runs (sign bit, difference below zero), 2-12 characters
    for c in (b"`" * 12 + b"0", b"`" * 11 + b"0", b"O", b"3O", b"35O", b"354O", b"3a0", b"ooooo1", b"0", b"1", b"?",
              b"351@", b"3510@", b"3510A5"):
        try:
            total = int(rlecheck.rle_counts(c).sum())
        except ValueError:
            total = 1
        try:
            rlecheck.check_rle(c, total, 1)
            expected.append(True)
        except ValueError:
            expected.append(False)
        counts.append(c)
        areas.append(total)
    assert 300 < expected.count(False) < 1000 and True in expected[-14:] and False in expected[-14:]
    assert rlecheck.rles_ok(counts, areas).tolist() == expected
    assert rlecheck.rles_ok([], []).tolist() == [] and rlecheck.rles_ok([b""], [1]).tolist() == [False]
