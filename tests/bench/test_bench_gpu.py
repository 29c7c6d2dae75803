"""`refbench bench gpu` (refbench/bench/gpu.py): its logic on the CPU, the GPU rows on a GPU only.

Timings are never asserted. On this CPU the benchmark must print one line and exit 0; the
pieces it is made of (a training step from loader-shaped uint8 batches, OOM as a result, the
table files) run here on the tiny models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from _harness import assert_cli_ok, cli
from refbench import bench
from refbench.bench import common
from refbench.bench import gpu as bench_gpu


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.bench_gpu(common.BenchSettings(workdir=tmp_path, images=20)) == []
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    result = cli("bench", "gpu", "--workdir", tmp_path, "--log", tmp_path / "log.jsonl", "--out", tmp_path / "out")
    assert_cli_ok(result)
    assert result.output.strip().count("\n") == 0 and "no CUDA device" in result.output
    assert not (tmp_path / "out").exists()


def test_a_training_step_from_a_loader_shaped_batch_learns(one_torch_thread):
    from refbench import models

    torch.manual_seed(0)
    net = models.build("blind", "tiny").train()
    batch = bench_gpu.synthetic_batch(4, net.image_size, torch.device("cpu"))
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8
    step = bench_gpu.make_step(net, torch.device("cpu"), None, channels_last=False)
    losses = [float(step(batch)) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_measure_train_times_steps_and_reports_oom_as_a_result(one_torch_thread, monkeypatch):
    from refbench import models

    build = lambda: models.build("blind", "tiny")  # noqa: E731
    ok = bench_gpu.measure_train(build, 2, 96, torch.device("cpu"), None, False, steps=1, warmup=0)
    assert ok["samples_s"] > 0 and not ok["oom"]

    def allocator_gives_up(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_gpu, "synthetic_batch", allocator_gives_up)
    oom = bench_gpu.measure_train(build, 64, 96, torch.device("cpu"), None, False, steps=1, warmup=0)
    assert oom["oom"] and math.isnan(oom["samples_s"])
    assert bench_gpu.is_oom(RuntimeError("CUDA error: out of memory"))  # older torch spells it so
    monkeypatch.setattr(bench_gpu, "synthetic_batch", lambda *a, **k: (_ for _ in ()).throw(ValueError("a real bug")))
    with pytest.raises(ValueError):  # anything but OOM is not swallowed
        bench_gpu.measure_train(build, 2, 96, torch.device("cpu"), None, False, steps=1, warmup=0)


def test_train_rows_name_oom_and_channels_last(one_torch_thread, monkeypatch):
    real = bench_gpu.measure_train

    def fake(build, batch, *args, **kwargs):  # batch 4 "does not fit"
        if batch == 4:
            return {"samples_s": math.nan, "peak_gib": math.nan, "oom": True}
        return real(build, batch, *args, **kwargs)

    monkeypatch.setattr(bench_gpu, "measure_train", fake)
    rows = bench_gpu.train_rows(torch.device("cpu"), models=("blind",), variant="tiny", batches=(2, 4), amp_dtype=None,
                                steps=1, warmup=0)
    assert [r.get("batch") for r in rows] == [2, 4, None]
    assert "OOM" in rows[1]["what"] and rows[1]["oom"] and "OOM" not in rows[0]["what"]
    assert "channels_last vs NCHW" in rows[2]["what"] and rows[2]["ours"] > 0 and rows[2]["baseline"] > 0


def test_tables_are_written_as_json_and_markdown(tmp_path):
    rows = [common.row("gpu", "eavl train samples/s, batch 8", 100.0, 100.0, None),
            common.row("gpu", "eavl train samples/s, batch 32: OOM", math.nan, 100.0, None)]
    js, md = bench.write_tables(rows, tmp_path / "out", "H100, torch 2.11")
    assert json.loads(js.read_text().replace("NaN", "null"))["rows"][0]["ours"] == 100.0
    text = md.read_text()
    assert text.startswith("H100, torch 2.11") and text.count("| gpu |") == 2 and "nan" in text
