"""Leaderboard: reported rows, the wide table, every export format, and the loaders' refusals."""

from __future__ import annotations

import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from _records import make_sentences, write
from refbench.errors import RefbenchError
from refbench.eval import results
from refbench.report import leaderboard as lb


@pytest.fixture()
def results_root(tmp_path) -> Path:
    root = tmp_path / "results"
    write(root, n=60, run="r1", sentences=make_sentences(60, seed=5))  # first eval of run r1
    time.sleep(0.002)
    write(root, n=60, run="r1", sentences=make_sentences(60, seed=6))  # re-eval of r1: this one counts
    write(root, n=60, run="r2", sentences=make_sentences(60, seed=7))
    write(root, n=60, run="r1", split="val", sentences=make_sentences(60, seed=8))
    return root


def _latest(root: Path, run: str, split: str) -> results.Record:
    recs = [r for r in results.iter_records(root) if r.model["run"] == run and r.split == split]
    return max(recs, key=lambda r: r.date)


# --------------------------------------------------------------------------- reported rows


def test_reported_rows_hold_the_published_numbers():
    rep = lb.load_reported()
    assert rep.height == 56
    row = rep.filter(
        (pl.col("method") == "EAVL") & (pl.col("variant") == "ViT-L")
        & (pl.col("dataset") == "refcoco_unc") & (pl.col("split") == "testB")
    ).row(0, named=True)
    assert (row["value"], row["metric"], row["protocol"]) == (71.59, "mIoU", "cris")
    assert "CRIS" in row["note"] and "Table 1" in row["source"]
    # EAVL and CRIS are mean IoU computed by CRIS's code (protocol cris); LAVT is at the input size, both metrics
    assert set(rep.filter(pl.col("method") != "LAVT")["metric"]) == {"mIoU"}
    assert set(rep.filter(pl.col("method") != "LAVT")["protocol"]) == {"cris"}
    lavt = rep.filter(pl.col("method") == "LAVT")
    assert set(lavt["protocol"]) == {"input"}
    assert lavt.filter((pl.col("metric") == "oIoU") & (pl.col("dataset") == "refcoco_unc") & (pl.col("split") == "val"))["value"].item() == 72.73
    assert lavt.filter((pl.col("metric") == "mIoU") & (pl.col("dataset") == "refcoco_unc") & (pl.col("split") == "val"))["value"].item() == 74.46
    assert rep["source"].str.len_chars().min() > 10


def test_ablation_rows():
    abl = lb.load_ablations()
    assert abl.height == 17
    assert set(abl["dataset"]) == {"refcoco+_unc"} and set(abl["split"]) == {"testA"}
    assert set(abl["variant"]) == {"ResNet-50"} and set(abl["epochs"]) == {50}
    t2 = abl.filter(pl.col("table") == 2).sort("num_queries")
    assert t2["num_queries"].to_list() == [1, 2, 4, 8, 16, 24, 32]
    assert t2.filter(pl.col("num_queries") == 24)["mIoU"].item() == 68.14
    fixed = abl.filter((pl.col("table") == 3) & (pl.col("aligner") == "fixed") & (pl.col("num_queries") == 16))
    assert fixed["mIoU"].item() == 66.52 and fixed["Pr@0.8"].item() == 50.56
    t4 = abl.filter((pl.col("table") == 4) & ~pl.col("global_feature") & ~pl.col("mqe"))
    assert t4["mIoU"].item() == 66.17


@pytest.mark.parametrize(
    "line, message",
    [
        ("EAVL,ViT-B,refcoco_unc,val,IoU,original,71.74,paper,", "metric"),
        ("EAVL,ViT-B,refcoco_unc,val,mIoU,lavt,71.74,paper,", "unknown protocol"),
        ("EAVL,ViT-B,refcoco_unc,val,mIoU,original,171.74,paper,", "not a percentage"),
        ("EAVL,ViT-B,refcoco_unc,val,mIoU,original,abc,paper,", "line 2: value"),
        ("EAVL,ViT-B,refcoco_unc,val,mIoU,original,71.74,,", "empty value"),
    ],
)
def test_load_reported_refuses_bad_rows(tmp_path, line, message):
    header = ",".join(lb.REPORTED_SCHEMA)
    (tmp_path / "bad.csv").write_text(f"{header}\n{line}\n")
    with pytest.raises(RefbenchError, match=message) as e:
        lb.load_reported(tmp_path)
    assert "bad.csv" in e.value.message


def test_load_reported_refuses_duplicates_and_wrong_columns(tmp_path):
    header = ",".join(lb.REPORTED_SCHEMA)
    row = "EAVL,ViT-B,refcoco_unc,val,mIoU,original,71.74,paper,"
    (tmp_path / "a.csv").write_text(f"{header}\n{row}\n")
    (tmp_path / "b.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(RefbenchError, match="appears more than once"):
        lb.load_reported(tmp_path)
    (tmp_path / "b.csv").write_text("method,value\nX,1\n")
    with pytest.raises(RefbenchError, match="columns"):
        lb.load_reported(tmp_path)


# --------------------------------------------------------------------------- the table


def test_table_rows_and_columns(results_root):
    t = lb.build_table(results_root, None, "refcoco_unc")
    vals = lb.value_columns(t)
    # mIoU and oIoU never share a column, nor do two protocols; each column names its metric
    for c in vals:
        assert ("mIoU" in c) != ("oIoU" in c)
        assert sum(f"(%, {p})" in c for p in ("original", "cris", "input")) == 1
    assert "testB mIoU (%, original)" in vals and "testB oIoU (%, original)" in vals
    assert "testB oIoU (%, input)" in vals
    for c in ("source", "method", "variant", "run", "dataset", "protocol"):
        assert c in t.columns
    assert set(t["dataset"]) == {"refcoco_unc"}
    assert t.select(lb.KEY).is_duplicated().sum() == 0  # one row per key

    measured = t.filter(pl.col("source") == "measured")
    assert sorted(measured["run"].to_list()) == ["r1", "r2"]  # each run its own row
    r1 = measured.filter(pl.col("run") == "r1").row(0, named=True)
    latest = _latest(results_root, "r1", "testB")
    assert r1["testB mIoU (%, original)"] == pytest.approx(100 * latest.metrics["mIoU"])
    assert r1["testB oIoU (%, original)"] == pytest.approx(100 * latest.metrics["oIoU"])
    assert r1["val mIoU (%, original)"] == pytest.approx(100 * _latest(results_root, "r1", "val").metrics["mIoU"])
    assert r1["protocol_version"] == 1 and r1.get("testA mIoU (%, original)") is None

    eavl = t.filter((pl.col("method") == "EAVL") & (pl.col("variant") == "ResNet-101")).row(0, named=True)
    assert (eavl["source"], eavl["protocol"], eavl["testB mIoU (%, cris)"]) == ("reported", "cris", 66.62)
    assert eavl["testB mIoU (%, original)"] is None  # the papers' numbers sit beside `cris`, not `original`
    assert "testB oIoU (%, cris)" not in t.columns  # EAVL and CRIS never published an oIoU
    lavt = t.filter(pl.col("method") == "LAVT").row(0, named=True)
    assert lavt["protocol"] == "input" and lavt["testB oIoU (%, input)"] == 68.79
    assert lavt["testB mIoU (%, original)"] is None


def test_unknown_dataset_is_one_clear_line(results_root):
    with pytest.raises(RefbenchError, match="no leaderboard rows for dataset 'coco'"):
        lb.build_table(results_root, None, "coco")


# --------------------------------------------------------------------------- exports


def _check_has_rows(text: str) -> None:
    for needle in ("measured", "reported", "eavl", "EAVL", "CRIS", "LAVT", "testB mIoU (%, original)", "testB mIoU (%, cris)",
                   "testB oIoU (%, input)"):
        assert needle in text, needle


def test_export_md(results_root, tmp_path):
    out = tmp_path / "lb.md"
    lb.main(dataset="refcoco_unc", fmt="md", out=out, results=results_root)
    text = out.read_text()
    _check_has_rows(text)
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in table_lines}
    assert len(widths) == 1  # a well-formed markdown table
    assert "Values are percent" in text


def test_export_csv(results_root, tmp_path):
    out = tmp_path / "lb.csv"
    table = lb.main(dataset="refcoco_unc", fmt="csv", out=out, results=results_root)
    back = pl.read_csv(out)
    assert back.columns == table.columns
    assert set(back["source"]) == {"measured", "reported"}
    r1 = back.filter(pl.col("run") == "r1").row(0, named=True)
    assert r1["testB mIoU (%, original)"] == pytest.approx(100 * _latest(results_root, "r1", "testB").metrics["mIoU"])
    _check_has_rows(out.read_text())


def test_export_json(results_root, tmp_path):
    out = tmp_path / "lb.json"
    lb.main(dataset="refcoco_unc", fmt="json", out=out, results=results_root)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "refbench-leaderboard" and doc["units"] == "percent (0-100)"
    sources = {r["source"] for r in doc["rows"]}
    assert sources == {"measured", "reported"}
    assert any(r["method"] == "EAVL" and r["testB mIoU (%, cris)"] == 66.62 for r in doc["rows"])
    assert set(doc["protocols"]) == {"original", "cris", "input"}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_export_html_is_self_contained_and_sortable(results_root, tmp_path):
    out = tmp_path / "lb.html"
    lb.main(dataset="refcoco_unc", fmt="html", out=out, results=results_root)
    text = out.read_text()
    _check_has_rows(text)
    parser = _Tags()
    parser.feed(text)
    names = [t for t, _ in parser.tags]
    assert "script" in names and "style" in names and "table" in names
    for tag, attrs in parser.tags:
        assert "src" not in attrs and "href" not in attrs, (tag, attrs)  # nothing loaded from anywhere
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert "addEventListener(\"click\"" in text  # sortable headers
    table = lb.build_table(results_root, None, "refcoco_unc")
    start = text.index('<script id="board-data" type="application/json">') + len('<script id="board-data" type="application/json">')
    doc = json.loads(text[start : text.index("</script>", start)])  # the page's data: every row and column
    assert len(doc["rows"]) == table.height
    assert [c["name"] for c in doc["columns"]] == lb.value_columns(table)
    assert doc["datasets"] == ["refcoco_unc"] and doc["protocols"] == ["original", "input", "cris"]  # cris: the papers' CRIS/EAVL rows
    # the page's behaviour (sorting, switching, provenance) is tested in a browser: test_leaderboard_page.py


def test_print_without_out(results_root, capsys):
    lb.main(dataset="refcoco_unc", fmt="md", out=None, results=results_root)
    printed = capsys.readouterr().out
    assert "refcoco_unc, protocol original: values in %" in printed
    assert "refcoco_unc, protocol input: values in %" in printed
    assert "EAVL" in printed and "r2" in printed
    lb.main(dataset="refcoco_unc", fmt="csv", out=None, results=results_root)
    back = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert "testB mIoU (%, original)" in back.columns


def test_leaderboard_cli_writes_atomically(results_root, tmp_path):
    from click.testing import CliRunner

    from refbench.cli import cli

    out = tmp_path / "board.html"
    res = CliRunner().invoke(cli, ["leaderboard", "--format", "html", "--out", str(out), "--results", str(results_root)])
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob(".tmp-*"))
