"""Result records: round trip, refusals, validation on load, concurrent writers, `refbench compare`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from refbench.errors import RefbenchError
from refbench.eval import metrics, results

from _records import make_sentences, write

REPO = Path(__file__).resolve().parents[2]


def test_round_trip(tmp_path):
    sents = make_sentences(60)
    path = write(tmp_path, sentences=sents)
    assert path.parent == tmp_path / "refcoco_unc" / "testB"
    assert re.fullmatch(r"eavl-r1-\d{8}T\d{12}Z-[0-9a-f]{8}\.json", path.name)
    sidecar = path.with_name(path.name[: -len(".json")] + results.SIDECAR_SUFFIX)
    assert sidecar.is_file()

    rec = results.load_record(path)
    m = rec.meta
    assert (m["schema"], m["schema_version"]) == ("refbench-result", 2)
    assert (rec.source, rec.submission) == ("measured", None)
    assert (rec.dataset, rec.split) == ("refcoco_unc", "testB")
    assert m["protocol"] == {
        "name": "original", "version": 1, "threshold": 0.35,
        "description": metrics.PROTOCOLS["original"].description, "pr_strict": False,
    }
    expected = metrics.summarize(sents["I"], sents["U"])
    for key, value in expected.items():
        assert m["metrics"][key] == value
    ci = metrics.bootstrap_ci(sents["I"], sents["U"], samples=200, seed=0)
    assert m["metrics"]["ci95"] == {k: list(v) for k, v in ci.items()}
    assert m["metrics"]["bootstrap"] == {"samples": 200, "seed": 0, "level": 0.95}
    assert m["model"] == {"name": "eavl", "variant": "tiny", "config": {"num_queries": 4}, "run": "r1",
                          "checkpoint": "runs/x/best.pt", "checkpoint_sha256": "ab" * 32, "step": 120}
    assert m["data"] == {"manifest_sha256": "cd" * 32, "sentences_expected": 60, "synthetic": False}
    prov = m["provenance"]
    assert prov["command"] == "refbench eval --checkpoint runs/x/best.pt"
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40,64}", prov["git_commit"])
    assert datetime.fromisoformat(prov["date"]).utcoffset().total_seconds() == 0
    import refbench

    assert prov["refbench_version"] == refbench.__version__
    assert set(m["breakdowns"]) == {"length", "category", "location_words"}
    assert m["sentences"]["file"] == sidecar.name and m["sentences"]["rows"] == 60

    df = rec.sentences
    assert df.columns == list(results.SENTENCE_COLUMNS)
    assert df["sent_id"].to_list() == sents["sent_id"] and df["sent"].to_list() == sents["sent"]
    assert df["IoU"][0] == 0.0  # the empty union
    # the record's metrics recomputed from its own per-sentence records agree
    again = metrics.summarize(df["I"].to_numpy(), df["U"].to_numpy())
    assert all(again[k] == m["metrics"][k] for k in again)


def test_accepts_a_polars_frame(tmp_path):
    path = write(tmp_path, sentences=pl.DataFrame(make_sentences(60)))
    assert results.load_record(path).metrics["n"] == 60


@pytest.mark.parametrize(
    "change, message",
    [
        ({"expected": 61}, "60 sentences scored, the manifest lists 61"),
        ({"dup": True}, "scored more than once"),
        ({"bad_iu": True}, "intersection larger than union"),
        ({"protocol": "lavt"}, "unknown metric protocol"),
        ({"drop": "sent"}, "lack column"),
    ],
)
def test_refuses_and_writes_nothing(tmp_path, change, message):
    sents = make_sentences(60)
    if change.get("dup"):
        sents["sent_id"][5] = sents["sent_id"][4]
    if change.get("bad_iu"):
        sents["I"][3] = sents["U"][3] + 1
    if "drop" in change:
        del sents[change["drop"]]
    with pytest.raises(RefbenchError, match=message):
        write(tmp_path, sentences=sents, expected=change.get("expected"), protocol=change.get("protocol", "original"))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def _tamper(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["metrics"].update(mIoU=m["metrics"]["mIoU"] + 0.01), "stored mIoU"),
        (lambda m: m["metrics"].update(n=59), "stored n"),
        (lambda m: m["metrics"].update({"Pr@0.7": 0.0}), r"stored Pr@0\.7"),
        (lambda m: m.update(schema_version=3), "schema version 3"),
        (lambda m: m.update(source="borrowed"), "source 'borrowed'"),
        (lambda m: m.update(source="submitted"), "without its submission's sha256"),
        (lambda m: m.update(schema="something-else"), "not a refbench result"),
        (lambda m: m["breakdowns"]["length"].clear(), "breakdowns disagree"),
        (lambda m: m["sentences"].update(sha256="0" * 64), "does not match the stored sha256"),
        (lambda m: m["metrics"]["ci95"].update(mIoU=[0.9, 0.1]), "not an interval"),
    ],
)
def test_load_refuses_inconsistent_records(tmp_path, edit, message):
    path = write(tmp_path)
    _tamper(path, edit)
    with pytest.raises(RefbenchError, match=message) as e:
        results.load_record(path)
    assert str(path) in e.value.message


def test_load_refuses_missing_sidecar_and_bad_json(tmp_path):
    path = write(tmp_path)
    meta = json.loads(path.read_text())
    (path.parent / meta["sentences"]["file"]).unlink()
    with pytest.raises(RefbenchError, match="sidecar .* is missing"):
        results.load_record(path)
    path.write_text("{not json")
    with pytest.raises(RefbenchError, match="not readable JSON"):
        results.load_record(path)
    with pytest.raises(RefbenchError, match="no such file"):
        results.load_record(tmp_path / "nope.json")


def test_iter_records_skips_temporary_files(tmp_path):
    a = write(tmp_path, split="val")
    b = write(tmp_path, split="testB")
    (b.parent / ".tmp-half-written.json.123").write_text("{")
    assert sorted(r.path for r in results.iter_records(tmp_path)) == sorted([a, b])
    assert list(results.iter_records(tmp_path / "missing")) == []


def test_concurrent_writers_both_recorded(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from _records import write
        from pathlib import Path
        go = Path(sys.argv[2])
        while not go.exists():
            time.sleep(0.005)
        for _ in range(5):
            write(Path(sys.argv[1]), run="same")
        """
    )
    go = tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "res"), str(go)], env=env, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    go.touch()  # both start writing at once
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    records = list(results.iter_records(tmp_path / "res"))
    assert len(records) == 10  # every record of both processes present and valid
    assert len({r.path.name for r in records}) == 10
    assert not list((tmp_path / "res").rglob(".tmp-*"))


# --------------------------------------------------------------------------- compare


def test_compare_sign_on_a_constructed_pair(tmp_path, capsys):
    a = write(tmp_path, n=400, run="base", sentences=make_sentences(400, seed=1))
    b = write(tmp_path, n=400, run="better", sentences=make_sentences(400, seed=1, gain=40))
    out = results.main_compare(a, b, samples=300, seed=0)
    rec_a, rec_b = results.load_record(a), results.load_record(b)
    assert out["n"] == 400
    assert out["mIoU"]["diff"] == pytest.approx(rec_b.metrics["mIoU"] - rec_a.metrics["mIoU"])
    assert out["oIoU"]["diff"] == pytest.approx(rec_b.metrics["oIoU"] - rec_a.metrics["oIoU"])
    for metric in ("mIoU", "oIoU"):
        assert out[metric]["diff"] > 0 and out[metric]["ci"][0] > 0
    printed = capsys.readouterr().out
    assert "B better" in printed and "mIoU (%)" in printed and "oIoU (%)" in printed

    back = results.main_compare(b, a, samples=300, seed=0)
    assert back["mIoU"]["diff"] < 0 and back["mIoU"]["ci"][1] < 0
    assert "A better" in capsys.readouterr().out


def test_compare_pairs_by_sent_id_not_row_order(tmp_path):
    sents = make_sentences(100, seed=2)
    shuffled = {k: v[::-1] for k, v in sents.items()}
    a = write(tmp_path, n=100, run="a", sentences=sents)
    b = write(tmp_path, n=100, run="b", sentences=shuffled)
    out = results.compare_records(results.load_record(a), results.load_record(b), samples=100)
    assert out["mIoU"]["diff"] == 0.0 and out["mIoU"]["ci"] == (0.0, 0.0)


def test_compare_refuses_mismatched_records(tmp_path):
    a = results.load_record(write(tmp_path, split="testB"))
    with pytest.raises(RefbenchError, match="dataset, split and protocol must match"):
        results.compare_records(a, results.load_record(write(tmp_path, split="val")))
    with pytest.raises(RefbenchError, match="protocol input"):
        results.compare_records(a, results.load_record(write(tmp_path, protocol="input")))
    other = make_sentences(60)
    other["sent_id"] = [i + 1000 for i in other["sent_id"]]
    with pytest.raises(RefbenchError, match="scored different sentences"):
        results.compare_records(a, results.load_record(write(tmp_path, sentences=other)))


def test_compare_cli(tmp_path):
    from refbench.cli import cli

    a = write(tmp_path, n=200, run="a", sentences=make_sentences(200, seed=3))
    b = write(tmp_path, n=200, run="b", sentences=make_sentences(200, seed=3, gain=30))
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--samples", "200"])
    assert res.exit_code == 0, res.output
    assert "B better" in res.output
    c = write(tmp_path, split="val")
    res = CliRunner().invoke(cli, ["compare", str(a), str(c)])
    assert res.exit_code == 2
    assert "error: cannot compare" in res.output
