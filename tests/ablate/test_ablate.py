"""`refbench ablate`: the plan (which runs, deduplicated), the report from fake records, a smoke run.

The full ablation (12 tiny-model trainings) is not run here. The smoke run trains 5 settings for
2 steps at batch 4 on the session's 48-image synthetic shards, then checks that a second
invocation retrains and rescores nothing and that a half-trained run is resumed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from refbench.ablate import run as ablate
from refbench.ablate.run import AblationConfig, Report, Row, Setting
from refbench.errors import RefbenchError
from refbench.eval import metrics
from refbench.report.leaderboard import load_ablations

FULL = Setting(24, "dynamic", True, True)


def _cfg(tmp_path: Path, **kw) -> AblationConfig:
    return AblationConfig(workdir=tmp_path, **kw)


# ------------------------------------------------------------------------------ planning


def test_default_plan_runs_each_setting_once_with_the_full_model_first(tmp_path):
    cfg = _cfg(tmp_path, steps=300)
    rows = ablate.table_rows(cfg)
    runs = ablate.plan_runs(cfg, rows)

    # 6 (Table 2) + 6 (Table 3: 3 Nq x 2 aligners) + 4 (Table 4) rows ...
    assert [sum(r.table == t for r in rows) for t in (2, 3, 4)] == [6, 6, 4]
    # ... but Nq 8/16/24 dynamic are Table 2 rows too, and Table 4's full model is Nq=24: 12 runs
    assert len(runs) == 12
    assert len({r.setting for r in runs}) == 12 and len({r.name for r in runs}) == 12
    assert runs[0].setting == FULL and runs[0].tables == (2, 3, 4)
    assert runs[0].name == "nq24-dynamic-s300"

    by_setting = {r.setting: r for r in runs}
    assert {s.num_queries for s in by_setting if s.aligner == "dynamic" and s.global_vision and s.estimator} == {1, 4, 8, 16, 24, 32}
    assert by_setting[Setting(8, "dynamic", True, True)].tables == (2, 3)
    assert by_setting[Setting(1, "dynamic", True, True)].tables == (2,)
    fixed = sorted(s.num_queries for s in by_setting if s.aligner == "fixed")
    assert fixed == [8, 16, 24]
    # the fixed kernel replaces the whole aligner, estimator included (the paper's mqe = false)
    assert all(not s.estimator for s in by_setting if s.aligner == "fixed")
    assert {(s.global_vision, s.estimator) for s in by_setting if s.num_queries == 24 and s.aligner == "dynamic"} == {
        (True, True), (False, True), (True, False), (False, False)}


def test_rows_are_compared_with_their_tables_reference(tmp_path):
    rows = ablate.table_rows(_cfg(tmp_path))
    for row in rows:
        if row.table in (2, 4):
            assert row.reference == FULL
        else:  # Table 3: fixed vs dynamic at the same Nq
            assert row.reference == Setting(row.setting.num_queries, "dynamic", True, True)
    assert Row(3, Setting(16, "fixed", True, False), Setting(16, "dynamic", True, True)) in rows


def test_every_planned_row_has_the_papers_row_and_a_valid_model_config(tmp_path):
    from refbench import models

    paper = load_ablations()
    for row in ablate.table_rows(_cfg(tmp_path)):
        p = ablate.paper_row(paper, row.table, row.setting)
        assert p is not None, row
        assert p["dataset"] == "refcoco+_unc" and p["split"] == "testA" and p["protocol"] == "cris"
        config = models.make_config("eavl", "tiny", **row.setting.overrides())
        assert (config.num_queries, config.aligner, config.global_vision, config.estimator) == (
            row.setting.num_queries, row.setting.aligner, row.setting.global_vision, row.setting.estimator)
    assert ablate.paper_row(paper, 2, FULL)["mIoU"] == pytest.approx(68.14)
    assert ablate.paper_row(paper, 3, Setting(24, "fixed", True, False))["mIoU"] == pytest.approx(66.75)


def test_smaller_plans_deduplicate_too(tmp_path):
    cfg = _cfg(tmp_path, steps=7, num_queries=(2, 8), fixed_queries=(8,), default_queries=8)
    runs = ablate.plan_runs(cfg)
    assert [r.name for r in runs] == [
        "nq8-dynamic-s7", "nq2-dynamic-s7", "nq8-fixed-s7",
        "nq8-dynamic-novg-s7", "nq8-dynamic-nomqe-s7", "nq8-dynamic-novg-nomqe-s7",
    ]


def test_runs_are_the_plans_train_configs(tmp_path):
    cfg = _cfg(tmp_path, steps=5, batch_size=8)
    run = ablate.plan_runs(cfg)[1]
    tc = ablate.train_config(cfg, run, tmp_path / "shards")
    assert (tc.model, tc.variant, tc.dataset, tc.seed) == ("eavl", "tiny", "refcoco+_unc", 0)
    assert tc.out == ablate.run_dir(cfg, run) and tc.model_overrides == run.setting.overrides()
    assert (tc.recipe.steps, tc.recipe.batch_size) == (5, 8)


def test_a_workdir_with_another_synthetic_dataset_is_refused_before_any_work(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "SYNTH.json").write_text(json.dumps({"images": 48, "seed": 0}))
    with pytest.raises(RefbenchError, match="48 images.*uses 2000 images"):
        ablate.ensure_data(_cfg(tmp_path, synth_images=2000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no shards, no runs


# ------------------------------------------------------------------------------ the report


def _fake_metrics(rng, n: int, mean_iou: float) -> dict:
    """A record's `metrics` entry for n sentences whose IoU is about `mean_iou`."""
    union = rng.integers(500, 2000, size=n)
    inter = np.clip(np.round(union * rng.normal(mean_iou, 0.15, size=n)), 0, union).astype(np.int64)
    out = metrics.summarize(inter, union)
    out["ci95"] = {k: list(v) for k, v in metrics.bootstrap_ci(inter, union, samples=200, seed=0).items()}
    out["_iou"] = metrics.iou(inter, union)
    return out


def _fake_report(tmp_path: Path) -> Report:
    cfg = _cfg(tmp_path, steps=300)
    rows = ablate.table_rows(cfg)
    rng = np.random.default_rng(0)
    # ours: the full model 0.60, the fixed kernel clearly worse, everything else about the same
    means = {s: (0.50 if s.aligner == "fixed" else 0.60) for r in rows for s in (r.setting, r.reference)}
    fake = {s: _fake_metrics(rng, 400, mu) for s, mu in means.items()}
    deltas = {}
    for r in rows:
        if r.setting != r.reference:
            deltas[(r.setting, r.reference)] = metrics.paired_bootstrap(
                fake[r.reference]["_iou"], fake[r.setting]["_iou"], samples=300, seed=0)
    measured = {s: {k: v for k, v in m.items() if k != "_iou"} for s, m in fake.items()}
    runs = [{"run": r.name, "tables": r.tables, "key": r.setting, "setting": r.setting.label, "checkpoint_step": 300, "val_mIoU": 0.6,
             "record": f"results/x/{r.name}.json", "train_seconds": 200.0, "eval_seconds": None}
            for r in ablate.plan_runs(cfg, rows)]
    facts = {"images": {"train": 1520}, "train_refs": 3707, "sentences": 400, "batch_size": 32, "epochs": 2.59,
             "steps_per_epoch": 116, "lr": 1e-3, "threshold": 0.35, "protocol_version": 1, "git_commit": None,
             "date": "2026-01-01T00:00:00+00:00", "wall_seconds": 3000.0}
    return Report(cfg=cfg, rows=rows, metrics=measured, deltas=deltas, paper=load_ablations(), runs=runs, facts=facts)


def _line(text: str, *starts: str) -> str:
    hits = [ln for ln in text.splitlines() if ln.startswith("| " + " | ".join(starts) + " |")]
    assert len(hits) == 1, (starts, hits)
    return hits[0]


def test_report_sets_our_numbers_beside_the_papers_with_both_metrics_named(tmp_path):
    report = _fake_report(tmp_path)
    text = ablate.render_report(report)
    full = report.metrics[FULL]

    # metric names for both sides
    assert 'Paper **"IoU"** is **mIoU**' in text and "IoU > X (strict)" in text and "IoU >= X" in text
    assert "What is and is not comparable" in text and "random init" in text
    # Table 2: the paper's full-model row and ours, Pr@X in the paper's order
    paper_24 = _line(text, "Nq=24", "paper").split(" | ")
    assert paper_24[2:5] == ["68.14", "not reported", "80.51"] and "0 (reference)" in paper_24[-1]
    ours_24 = _line(text, "Nq=24", "ours")
    lo, hi = full["ci95"]["mIoU"]
    assert f"{100 * full['mIoU']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]" in ours_24
    assert f"| {100 * full['oIoU']:.2f} |" in ours_24 and f"| {100 * full['Pr@0.9']:.2f} |" in ours_24
    # the paper's Nq=2 row is shown, ours marked as not run
    assert _line(text, "Nq=2", "paper").split(" | ")[2] == "65.80"
    assert "not run" in _line(text, "Nq=2", "ours")
    # paper deltas are differences of the paper's rows
    assert _line(text, "Nq=1", "paper").endswith("| -2.72 |")  # 65.42 - 68.14
    assert _line(text, "Nq=8, Fixed", "paper").endswith("| -0.76 |")  # 66.09 - 66.85
    # our delta is the paired bootstrap of that row against its reference
    d = report.deltas[(Setting(8, "fixed", True, False), Setting(8, "dynamic", True, True))]
    assert f"{100 * d['diff']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]" in _line(text, "Nq=8, Fixed", "ours")
    assert _line(text, "F_vg off, MQE off", "paper").split(" | ")[2] == "66.17"


def test_shape_summary_reads_direction_only_when_the_interval_excludes_zero(tmp_path):
    report = _fake_report(tmp_path)
    text = ablate.render_report(report)
    shape = text.split("## Shape")[1].split("## Runs")[0]
    fixed_rows = [ln for ln in shape.splitlines() if "fixed aligner" in ln]
    assert len(fixed_rows) == 3
    for ln in fixed_rows:  # ours: 0.50 vs 0.60 with 400 sentences; the paper: fixed worse too
        assert ln.endswith("| same direction as the paper |")
    table4 = [ln for ln in shape.splitlines() if ln.startswith("| 4 |")]
    assert len(table4) == 3
    for ln in table4:
        setting = next(s for (s, ref) in report.deltas if ref == FULL and s.label in ln)
        lo, hi = report.deltas[(setting, FULL)]["ci"]
        expected = "no difference measured" if lo <= 0 <= hi else "direction"
        assert expected in ln


def test_plot_is_a_png_with_both_panels(tmp_path):
    report = _fake_report(tmp_path)
    out = ablate.plot_nq(report, tmp_path / "nq.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 2 * im.size[1] > 400  # two panels side by side
    assert not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------------------ smoke run


def test_smoke_run_then_rerun_reuses_everything_and_resumes_a_partial_run(tmp_path, shards_root):
    from refbench import checkpoint
    from refbench.eval import results
    from refbench.train import TrainConfig, run_state, train

    def state(run):
        return run_state(ablate.train_config(cfg, run, shards_root)).state

    cfg = AblationConfig(workdir=tmp_path / "abl", shards=shards_root, steps=2, batch_size=4, workers=0,
                         num_queries=(2,), fixed_queries=(2,), default_queries=2, eval_batch_size=16,
                         bootstrap_samples=200)
    runs = ablate.plan_runs(cfg)
    assert len(runs) == 5
    # a run killed after its first step: last.pt at step 1 of 2
    partial = runs[1]
    train(TrainConfig(
        model="eavl", variant="tiny", dataset=cfg.dataset, shards=shards_root,
        recipe=ablate.recipe(cfg), out=ablate.run_dir(cfg, partial), seed=cfg.seed,
        model_overrides=partial.setting.overrides(), stop_after=1, quiet=True,
    ))
    assert state(partial) == "resume"

    report_path = ablate.run_ablation(cfg)

    text = report_path.read_text()
    assert "## Table 2" in text and "## Table 3" in text and "## Table 4" in text
    assert (cfg.workdir / ablate.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    records = list(results.iter_records(cfg.workdir / "results"))
    assert sorted(r.model["run"] for r in records) == sorted(r.name for r in runs)
    for rec in records:
        assert (rec.dataset, rec.split, rec.protocol["name"]) == ("refcoco+_unc", "testA", "original")
        assert rec.metrics["n"] == rec.meta["data"]["sentences_expected"]
    for run in runs:
        assert state(run) == "done"
        assert checkpoint.load(ablate.run_dir(cfg, run) / "last.pt")["step"] == 2
        assert checkpoint.load(ablate.run_dir(cfg, run) / "best.pt")["model"]["config"]["aligner"] == run.setting.aligner

    stamps = {p: p.stat().st_mtime_ns for p in cfg.workdir.rglob("*.pt")}
    ablate.run_ablation(dataclasses.replace(cfg))
    assert {p: p.stat().st_mtime_ns for p in cfg.workdir.rglob("*.pt")} == stamps  # nothing retrained
    assert len(list(results.iter_records(cfg.workdir / "results"))) == len(runs)  # nothing rescored
