"""`refbench bench model` (refbench.bench): rows, ratios, the JSON-lines log, bad names."""

from __future__ import annotations

import json

import pytest

from refbench import bench
from refbench.errors import RefbenchError


def test_bench_model_rows_and_log(tmp_path):
    log = tmp_path / "logs" / "bench.jsonl"
    settings = bench.BenchSettings(workdir=tmp_path / "work", images=20, log=log,
                                   model_settings=(("tiny", 2, 1),), model_warmup=1)  # one timed step: seconds
    rows = bench.main(which=("model",), settings=settings)
    step, params = rows
    assert "fwd+bwd step" in step["what"] and "tiny" in step["what"] and "batch 2" in step["what"]
    assert step["ours"] > 0 and step["baseline"] > 0
    assert step["ratio"] == pytest.approx(step["ours"] / step["baseline"])  # one repetition: ratio of the times
    assert step["target"] == "<= 1.15" and step["ok"] == (step["ratio"] <= 1.15)
    assert params["target"] is None and params["ok"] is None
    assert 5 < params["ours"] < 30 and 5 < params["baseline"] < 30  # tiny models: ~10-15 M parameters

    bench.main(which=("model",), settings=settings)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2  # one line appended per run
    assert records[0]["benches"] == ["model"] and records[0]["rows"] == rows
    assert not list(log.parent.glob(".tmp-*"))  # atomic: no temporary left behind


def test_unknown_benchmark_is_one_clear_error(tmp_path):
    with pytest.raises(RefbenchError, match="not implemented") as err:
        bench.main(which=("model", "nope"), settings=bench.BenchSettings(workdir=tmp_path, images=20, log=tmp_path / "b.jsonl"))
    assert "model" in err.value.hint
    assert not (tmp_path / "b.jsonl").exists()  # nothing ran, nothing logged
