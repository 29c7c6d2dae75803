"""The leaderboard's gRefCOCO part (refbench.report.gres_board): its own columns from a scored
gRefCOCO record, the reported ReLA row under `rela`, null values as "-", RefCOCO boards unchanged,
markup in a method name escaped, and the page in a browser where Chromium runs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pycocotools import mask as mask_utils


from _records import make_sentences, write

from refbench.data import shards as data  # noqa: E402
from refbench.errors import RefbenchError  # noqa: E402
from refbench.eval import gres_metrics, gres_score, results, score  # noqa: E402
from refbench.report import leaderboard as lb  # noqa: E402

DS, SPLIT = "grefcoco_unc", "val"
RIS_METRICS = ("mIoU", "oIoU")


def _metric(column: str) -> str:
    return column.split(" ")[1]


def _submission(shards_root: Path, path: Path, *, miss_every: int = 0) -> Path:
    """The GT masks of the synthetic gRefCOCO val as a submission (every `miss_every`-th emptied)."""
    lines = []
    for meta in data.split_images(shards_root / DS, split=SPLIT):
        for r in meta["refs"]:
            m = mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()}).astype(bool)
            for s in r["sentences"]:
                pred = m if not miss_every or len(lines) % miss_every else np.zeros_like(m)
                lines.append(json.dumps({"sent_id": int(s["sent_id"]), "rle": score.encode_mask(pred)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def gres_root(shards_root, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gres-board")
    root = tmp / "results"
    gres_score.score_submission(_submission(shards_root, tmp / "oracle.jsonl"), dataset=DS, split=SPLIT, method="oracle",
                                shards=shards_root, results=root)
    gres_score.score_submission(_submission(shards_root, tmp / "lossy.jsonl", miss_every=3), dataset=DS, split=SPLIT,
                                method="<script>alert(1)</script>", shards=shards_root, results=root, note="a <b>note</b>")
    return root


def test_a_gres_record_gets_gres_columns_only(gres_root):
    t = lb.build_table(gres_root, None, DS)
    vals = lb.value_columns(t)
    assert vals and all(_metric(c) in gres_metrics.METRIC_KEYS for c in vals)  # no mIoU / oIoU column for gRefCOCO
    for metric in gres_metrics.METRIC_KEYS:
        assert f"val {metric} (%, original)" in vals  # the record's protocol, named in each column
    assert vals[:7] == [f"val {m} (%, original)" for m in gres_metrics.METRIC_KEYS]
    oracle = t.filter(pl.col("method") == "oracle").row(0, named=True)
    assert (oracle["source"], oracle["protocol"], oracle["protocol_version"]) == ("submitted (synthetic)", "original", 1)
    rec = results.load_record(next((gres_root / DS / SPLIT).glob("oracle-*.json")))
    for metric in gres_metrics.METRIC_KEYS:
        assert oracle[f"val {metric} (%, original)"] == pytest.approx(100 * rec.metrics[metric])  # percent
    assert oracle["val gIoU (%, original)"] == 100.0 and oracle["val gIoU (%, rela)"] is None
    assert "no-target" in oracle["note"] and rec.submission["sha256"] in oracle["note"]


def test_the_reported_rela_row_sits_under_rela(gres_root):
    rep = lb.load_reported_gres()
    assert rep.height == 2 and set(rep["protocol"]) == {"rela"} and set(rep["variant"]) == {"Swin-B"}
    t = lb.build_table(gres_root, None, DS)
    rela = t.filter(pl.col("method") == "ReLA").row(0, named=True)
    assert (rela["source"], rela["variant"], rela["protocol"]) == ("reported", "Swin-B", "rela")
    assert rela["val cIoU (%, rela)"] == 62.42 and rela["val gIoU (%, rela)"] == 63.60
    assert rela["val gIoU (%, original)"] is None  # ReLA's code computed it: not our `original` protocol
    assert "val N-acc (%, rela)" not in t.columns  # N-acc / T-acc not published in that row, no rela record here
    assert "GRES" in rela["reference"] and "CVPR 2023" in rela["reference"]
    assert "issues/10" in rela["note"] and "66.34 gIoU / 63.10 cIoU" in rela["note"]


def test_refcoco_and_grefcoco_never_share_a_column(gres_root, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(gres_root, root)
    write(root, n=60, run="r1", sentences=make_sentences(60, seed=5))  # a RefCOCO record (refcoco_unc testB)
    t = lb.build_table(root)
    ris = [c for c in lb.value_columns(t) if _metric(c) in RIS_METRICS]
    gres = [c for c in lb.value_columns(t) if _metric(c) in gres_metrics.METRIC_KEYS]
    assert ris and gres and len(ris) + len(gres) == len(lb.value_columns(t))
    assert lb.value_columns(t) == ris + gres  # RefCOCO's columns first
    for row in t.iter_rows(named=True):
        filled = {_metric(c) in gres_metrics.METRIC_KEYS for c in ris + gres if row[c] is not None}
        assert filled == {row["dataset"] == DS}, row["method"]


def test_refcoco_boards_are_unchanged(gres_root, tmp_path):
    """A RefCOCO board is byte-identical with or without gRefCOCO records and reported rows."""
    ris = tmp_path / "ris"
    write(ris, n=60, run="r1", sentences=make_sentences(60, seed=5))
    both = tmp_path / "both"
    shutil.copytree(ris, both)
    shutil.copytree(gres_root / DS, both / DS)
    no_gres = tmp_path / "reported"
    shutil.copytree(lb.default_reported(), no_gres, ignore=shutil.ignore_patterns("gres"))
    for fmt in ("md", "csv", "json", "html"):
        for ds in ("refcoco_unc", "refcoco+_unc"):
            plain = lb.render(lb.build_table(ris, no_gres, ds), fmt, "t")
            assert lb.render(lb.build_table(both, None, ds), fmt, "t") == plain, (fmt, ds)
    assert "gRefCOCO" not in lb.render(lb.build_table(ris, None, "refcoco_unc"), "md", "t")


def test_null_values_show_as_dash(tmp_path):
    """A split without targeted sentences: T-acc and Pr@X have nothing to count (null in the record)."""
    n = 6
    cols = {"sent_id": list(range(n)), "ref_id": list(range(n)), "image_id": list(range(n)), "n_targets": [0] * n,
            "sent": ["nothing"] * n, "I": [0] * n, "U": [0, 0, 5, 0, 0, 0], "pred_no_target": [True, True, False, True, True, True]}
    gres_score.write_record(tmp_path / "r", dataset=DS, split="testA", protocol="original",
                            model=results.ModelInfo(name="nt", variant="v", run="submitted"),
                            data=results.DataInfo(manifest_sha256="ab" * 32, sentences_expected=n, synthetic=True),
                            columns=cols, command="test",
                            submission={"file": "nt.jsonl", "format": "rle-jsonl", "sha256": "cd" * 32, "entries": n, "note": ""})
    t = lb.build_table(tmp_path / "r", None, DS)
    row = t.filter(pl.col("method") == "nt").row(0, named=True)
    assert row["testA T-acc (%, original)"] is None and row["testA Pr@0.7 (%, original)"] is None
    assert row["testA N-acc (%, original)"] == pytest.approx(100 * 5 / 6)
    md = lb.render(t, "md", "t")
    header = next(line for line in md.splitlines() if line.startswith("| source"))
    cells = next(line for line in md.splitlines() if "| nt |" in line)
    i = header.split(" | ").index("testA T-acc (%, original)")
    assert cells.split(" | ")[i] == "-"
    back = pl.read_csv(io.StringIO(lb.render(t, "csv", "t")))
    assert back.filter(pl.col("method") == "nt")["testA T-acc (%, original)"].item() is None
    doc = json.loads(lb.render(t, "json", "t"))
    assert next(r for r in doc["rows"] if r["method"] == "nt")["testA T-acc (%, original)"] is None


def test_every_export_names_the_gres_protocol(gres_root):
    t = lb.build_table(gres_root, None, DS)
    md = lb.render(t, "md", "t")
    assert "val gIoU (%, original)" in md and "val cIoU (%, rela)" in md and "63.60" in md and "62.42" in md
    assert "gRefCOCO protocol rela (v1)" in md
    assert "val N-acc (%, original)" in lb.render(t, "csv", "t").splitlines()[0]
    doc = json.loads(lb.render(t, "json", "t"))
    assert set(doc["gres_protocols"]) == {"original", "rela"} and doc["units"] == "percent (0-100)"
    assert any(r["method"] == "ReLA" and r["val gIoU (%, rela)"] == 63.6 for r in doc["rows"])


def test_html_escapes_a_method_holding_markup(gres_root):
    text = lb.render(lb.build_table(gres_root, None, DS), "html", "t")
    assert "<script>alert" not in text and "<b>note" not in text
    start = text.index('<script id="board-data" type="application/json">') + len('<script id="board-data" type="application/json">')
    doc = json.loads(text[start : text.index("</script>", start)])
    assert "<script>alert(1)</script>" in {r["method"] for r in doc["rows"]}  # shown as text, as submitted
    assert doc["gres_datasets"] == [DS] and set(doc["gres_protocol_notes"]) == {"original", "rela"}
    assert {c["metric"] for c in doc["columns"]} <= set(gres_metrics.METRIC_KEYS)


@pytest.mark.parametrize(
    "line, message",
    [
        ("ReLA,Swin-B,grefcoco_unc,val,mIoU,rela,63.6,paper,", "gRefCOCO row is exactly one of"),
        ("ReLA,Swin-B,grefcoco_unc,val,gIoU,cris,63.6,paper,", "unknown protocol"),
        ("ReLA,Swin-B,refcoco_unc,val,gIoU,rela,63.6,paper,", "not gRefCOCO"),
        ("ReLA,Swin-B,grefcoco_unc,val,gIoU,rela,163.6,paper,", "not a percentage"),
    ],
)
def test_load_reported_gres_refuses_bad_rows(tmp_path, line, message):
    (tmp_path / "gres").mkdir()
    (tmp_path / "gres" / "bad.csv").write_text(",".join(lb.REPORTED_SCHEMA) + f"\n{line}\n")
    with pytest.raises(RefbenchError, match=message) as e:
        lb.load_reported_gres(tmp_path)
    assert "bad.csv" in e.value.message


def test_gres_page_in_a_browser(gres_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_leaderboard_page import _driver, _header_keys, _rows

    out = tmp_path / "board.html"
    lb.main(dataset=DS, fmt="html", out=out, results=gres_root)
    driver = _driver(1366, 900)
    try:
        driver.get(out.as_uri())
        protocol = Select(driver.find_element(By.ID, "protocol"))
        assert [o.text for o in protocol.options] == ["original", "rela"]
        keys = _header_keys(driver)
        assert "val gIoU (%, original)" in keys and not any("mIoU" in (k or "") for k in keys)
        assert "<script>alert(1)</script>" in {r[1] for r in _rows(driver)}  # text, not a script
        assert "TP/(TP+FN)" in driver.find_element(By.ID, "protocol-note").text  # gRefCOCO's original, not RefCOCO's
        protocol.select_by_visible_text("rela")
        rows = _rows(driver)
        assert [r[1] for r in rows] == ["ReLA"] and "63.60" in rows[0] and "62.42" in rows[0]
        assert "480x480" in driver.find_element(By.ID, "protocol-note").text
        assert not driver.execute_script("return window.__xss === true")
    finally:
        driver.quit()
