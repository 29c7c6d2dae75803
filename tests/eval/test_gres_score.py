"""`refbench sentences` / `refbench score` on the synthetic gRefCOCO (refbench.eval.gres_score): no label
leaks, perfect and random submissions under both protocols against an independent implementation,
the no_target key, refusals, and the record's round trip."""

from __future__ import annotations

import json
import math

import _gres_reference_eval as ref
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refbench.data import shards as data
from refbench.errors import RefbenchError
from refbench.eval import gres_records, gres_score, results, score

DS, SPLIT = "grefcoco_unc", "val"


@pytest.fixture(scope="module")
def gt(shards_root):
    """Per sentence: (sent_id, image h, w, GT mask at the image size, GT mask at 480 (rasterised here), no-target)."""
    rows = []
    for meta in data.split_images(shards_root / DS, split=SPLIT):
        h, w = meta["height"], meta["width"]
        for r in meta["refs"]:
            m = mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()}).astype(bool)
            m480 = np.zeros((480, 480), bool)
            for t in r["targets"]:  # scaled the way detectron2 scales (x * 480/w, y * 480/h), independently of refbench
                scaled = [[v * (480 / w) if k % 2 == 0 else v * (480 / h) for k, v in enumerate(p)] for p in t["segmentation"]]
                m480 |= mask_utils.decode(mask_utils.frPyObjects(scaled, 480, 480)).any(axis=2)
            for s in r["sentences"]:
                rows.append((s["sent_id"], h, w, m, m480, r["no_target"]))
    return rows


def _write(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _entry(sid, mask, no_target=None):
    e = {"sent_id": int(sid), "rle": score.encode_mask(mask)}
    if no_target is not None:
        e["no_target"] = bool(no_target)
    return e


def test_sentences_leak_no_label(shards_root, capsys):
    n = gres_score.main_sentences(DS, SPLIT, shards_root, None)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    manifest = data.load_manifest(shards_root / DS)
    assert n == len(lines) == manifest["splits"][SPLIT]["sentences"]
    assert all(list(x) == list(gres_score.SENTENCE_FIELDS) for x in lines)  # no ann_id, category_id, ref_id
    assert [(x["image_id"], x["sent_id"]) for x in lines] == sorted((x["image_id"], x["sent_id"]) for x in lines)
    truth = gres_score.ground_truth(shards_root / DS, split=SPLIT)
    assert any(truth.no_target) and {x["sent_id"] for x in lines} == set(truth.sent_id)  # no-target ones listed


def test_synthetic_grefcoco_has_every_kind(shards_root):
    truth = gres_score.ground_truth(shards_root / DS, split="train")
    k = np.array(truth.n_targets)
    assert 0.04 < np.mean(k == 0) < 0.2 and 0.2 < np.mean(k >= 2) < 0.45
    manifest = data.load_manifest(shards_root / DS)
    assert set(manifest["splits"]) == {"train", "val", "testA", "testB"} and manifest["gres"]["absent_splits"] == []


def test_perfect_submission_both_protocols(shards_root, gt, tmp_path):
    sub = _write(tmp_path / "perfect.jsonl", [_entry(sid, m) for sid, _, _, m, _, _ in gt])  # empty mask = no target
    out = gres_score.score_submission(sub, dataset=DS, split=SPLIT, method="oracle", shards=shards_root, results=tmp_path / "r")
    m = results.load_record(out.record).metrics
    assert m["gIoU"] == m["cIoU"] == m["N-acc"] == m["T-acc"] == m["Pr@0.9"] == 1.0 and m["FN"] == m["FP"] == 0
    sub480 = _write(tmp_path / "perfect480.jsonl", [_entry(sid, m480, nt) for sid, _, _, _, m480, nt in gt])
    out = gres_score.score_submission(sub480, dataset=DS, split=SPLIT, method="oracle", shards=shards_root,
                                 results=tmp_path / "r", protocol="rela")
    rec = results.load_record(out.record)
    m = rec.metrics
    tp = m["TP"]
    assert m["gIoU"] == m["cIoU"] == 1.0 and math.isclose(m["N-acc"], tp / (tp + 1)) and math.isclose(m["T-acc"], tp / (tp + 1))
    assert rec.protocol["name"] == "rela" and rec.meta["task"] == "gres"
    assert set(rec.meta["breakdowns"]["n_targets"]) <= {"0", "1", "2", "3+"}
    assert rec.sentences.columns == list(gres_records.GRES_COLUMNS)


@pytest.mark.parametrize("protocol", ["original", "rela"])
def test_random_submission_agrees_with_the_independent_implementation(shards_root, gt, tmp_path, protocol):
    rng = np.random.default_rng(7)
    entries, items = [], []
    for sid, h, w, m, m480, nt in gt:
        g = m480 if protocol == "rela" else m
        pred = rng.random(g.shape) < rng.uniform(0, 0.3)
        if rng.random() < 0.5:
            pred = g ^ (rng.random(g.shape) < 0.02)
        if rng.random() < 0.15:
            pred[:] = False
        flag = None if rng.random() < 0.5 else bool(rng.random() < 0.2)  # the key, or the empty-mask rule
        entries.append(_entry(sid, pred, flag))
        items.append((pred, (not pred.any()) if flag is None else flag, g, nt))
    sub = _write(tmp_path / "random.jsonl", entries)
    out = gres_score.score_submission(sub, dataset=DS, split=SPLIT, method="random", shards=shards_root,
                                 results=tmp_path / "r", protocol=protocol)
    m = results.load_record(out.record).metrics
    t = ref.rela_metrics(items, variant="initial") if protocol == "rela" else ref.named_metrics(items)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (t["TP"], t["FN"], t["FP"], t["TN"])
    for ours, key in (("gIoU", "gIoU"), ("cIoU", "cIoU"), ("N-acc", "N_acc"), ("T-acc", "T_acc"), ("Pr@0.7", "Pr@0.7")):
        assert math.isclose(m[ours], t[key], rel_tol=1e-12), ours


def test_bad_submissions_are_one_line_and_write_nothing(shards_root, gt, tmp_path):
    res = tmp_path / "r"
    entries = [_entry(sid, m) for sid, _, _, m, _, _ in gt]
    entries[2]["no_target"] = "yes"
    with pytest.raises(RefbenchError) as e:
        gres_score.score_submission(_write(tmp_path / "a.jsonl", entries), dataset=DS, split=SPLIT, method="x",
                               shards=shards_root, results=res)
    assert "no_target" in str(e.value) and "line 3" in str(e.value) and "\n" not in str(e.value)
    entries[2]["no_target"] = False
    with pytest.raises(RefbenchError) as e:  # image-size masks under rela
        gres_score.score_submission(_write(tmp_path / "b.jsonl", entries), dataset=DS, split=SPLIT, method="x",
                               shards=shards_root, results=res, protocol="rela")
    assert "480x480" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RefbenchError):
        gres_score.score_submission(_write(tmp_path / "c.jsonl", entries), dataset=DS, split=SPLIT, method="x",
                               shards=shards_root, results=res, protocol="cris")
    assert not res.exists()


def test_tampered_record_is_refused(shards_root, gt, tmp_path):
    sub = _write(tmp_path / "s.jsonl", [_entry(sid, m) for sid, _, _, m, _, _ in gt])
    out = gres_score.score_submission(sub, dataset=DS, split=SPLIT, method="oracle", shards=shards_root, results=tmp_path / "r")
    meta = json.loads(out.record.read_text())
    meta["metrics"]["T-acc"] = 0.5
    out.record.write_text(json.dumps(meta))
    with pytest.raises(RefbenchError, match="disagree"):
        results.load_record(out.record)


@pytest.mark.parametrize("ci,match", [([0.2, 1.5], "not an interval"), ([0.9, 0.1], "not an interval"), ("wide", "not an interval"),
                                      (None, None)])
def test_intervals_are_checked_for_shape_on_load(shards_root, gt, tmp_path, ci, match):
    """As RefCOCO records' are: a stored interval outside [0, 1] or upside down is refused; the
    bootstrap is not redrawn on load (a null interval of a defined value is allowed, as written
    where no resample defines it)."""
    sub = _write(tmp_path / "s.jsonl", [_entry(sid, m) for sid, _, _, m, _, _ in gt])
    out = gres_score.score_submission(sub, dataset=DS, split=SPLIT, method="m", shards=shards_root, results=tmp_path / "r")
    meta = json.loads(out.record.read_text())
    meta["metrics"]["ci95"]["gIoU"] = ci
    out.record.write_text(json.dumps(meta))
    if match is None:
        assert results.load_record(out.record).meta["metrics"]["ci95"]["gIoU"] is None
    else:
        with pytest.raises(RefbenchError, match=match):
            results.load_record(out.record)
    del meta["metrics"]["bootstrap"]
    out.record.write_text(json.dumps(meta))
    with pytest.raises(RefbenchError, match="bootstrap is missing" if match is None else match):
        results.load_record(out.record)


def test_cli_score_prints_what_it_is(shards_root, gt, tmp_path):
    from click.testing import CliRunner

    from refbench.cli import cli

    sub = _write(tmp_path / "s.jsonl", [_entry(sid, m) for sid, _, _, m, _, _ in gt])
    res = CliRunner().invoke(cli, ["score", str(sub), "--dataset", DS, "--split", SPLIT, "--method", "oracle",
                                   "--shards", str(shards_root), "--results", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "gRefCOCO" in res.output and "synthetic" in res.output and "protocol original" in res.output and "N-acc" in res.output
