"""`refbench bench step` (refbench.bench.step): where a tiny training step goes, at a tiny size.

Checks what the breakdown says, never timings: every phase of `train._optimizer_step` is
there, the model parts are the backbone's towers and the model's other children, the parts'
forward and backward times fit inside the forward and backward phases, rows are ms per step
with the profiled step as the baseline.
"""

from __future__ import annotations

import pytest
import torch

from refbench import bench, models
from refbench.bench import step


def test_model_parts_split_the_backbone_into_towers():
    torch.manual_seed(0)
    blind = models.build("blind", "tiny")
    assert list(step.model_parts(blind)) == ["backbone.image_encoder", "neck", "head"]  # no text tower
    eavl = models.build("eavl", "tiny")
    assert list(step.model_parts(eavl)) == ["backbone.image_encoder", "backbone.text_encoder", "fusion_neck",
                                             "query_generator", "decoder", "aligner"]


def test_bench_step_breakdown_rows(tmp_path):
    settings = bench.BenchSettings(workdir=tmp_path / "work", images=20, log=tmp_path / "bench.jsonl",
                                   step_models=("eavl",), step_batch=2, step_steps=2, step_warmup=1)
    rows = bench.main(which=("step",), settings=settings)
    assert all(r["bench"] == "step" and r["target"] is None and r["ok"] is None for r in rows)
    assert all(r["ratio"] == pytest.approx(r["ours"] / r["baseline"]) for r in rows)
    for model in ("eavl",):
        mine = [r for r in rows if r["what"].startswith(f"{model}:")]
        whole = mine[0]
        assert "whole step, no profiler" in whole["what"] and "batch 2" in whole["what"] and whole["ours"] > 0
        ms = {r["what"].split(":", 1)[1].strip().rsplit(",", 1)[0]: r["ours"] for r in mine[1:]}
        for _, label in step.PHASES:
            if label != "query-diversity figures":  # computed on log steps only (none of 2 here)
                assert label in ms, (label, sorted(ms))
        fwd = {k: v for k, v in ms.items() if k.startswith("forward of ")}
        bwd = {k: v for k, v in ms.items() if k.startswith("backward of ")}
        assert "forward of backbone.image_encoder" in fwd and "backward of backbone.image_encoder" in bwd
        assert {"forward of backbone.text_encoder", "forward of decoder", "forward of aligner"} <= set(fwd)
        assert 0 < sum(fwd.values()) <= ms["forward"] * 1.001
        assert 0 < sum(bwd.values()) <= ms["backward"] * 1.001
        assert sum(ms[label] for _, label in step.PHASES if label in ms) <= mine[1]["baseline"] * 1.001
