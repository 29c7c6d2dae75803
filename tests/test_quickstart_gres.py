"""`refbench quickstart --task gres` end to end on the tiny plan (`gres-fast`): tiny EAVL, CRIS,
blind trained side by side on synthetic grefcoco_unc, each scored into gRefCOCO records, the
summary table naming gIoU, cIoU, N-acc, T-acc per model and split; the default task unchanged."""

from __future__ import annotations

import pytest

from refbench import quickstart
from refbench.eval import results
from refbench.train import plans


def test_gres_fast_plan_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    summary = quickstart.main(workdir=tmp_path, fast=True, task="gres")
    plan = plans.PLANS["gres-fast"]
    assert summary["task"] == "gres" and set(summary["scores"]) == set(plan.models)
    for model, per in summary["scores"].items():
        assert set(per) == set(plan.eval_splits)
        assert all(v["nt_head"] == ("nt_head" in plan.model_overrides.get(model, {})) for v in per.values())
    for path in summary["records"]:
        rec = results.load_record(path)  # every metric recomputed from the sidecar
        assert rec.meta["task"] == "gres" and rec.meta["dataset"] == "grefcoco_unc" and rec.meta["data"]["synthetic"]
    out = capsys.readouterr().out
    assert "gRefCOCO protocol original" in out and "val N-acc %" in out and "testB gIoU %" in out
    assert "eavl (empty mask)" in out and "blind (empty mask)" in out  # the plans' rule (plans.GRES_NT_HEAD)
    # the leaderboard: gRefCOCO's columns, every model measured on the synthetic set, ReLA's reported row
    assert summary["leaderboard"]["md"] == str(tmp_path / "leaderboard.md") and (tmp_path / "leaderboard.html").is_file()
    rows = [line for line in (tmp_path / "leaderboard.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert {"testB gIoU (%, original)", "val N-acc (%, original)", "val Pr@0.9 (%, original)", "val gIoU (%, rela)"} <= set(header)
    assert not any("mIoU" in c for c in header)
    cells = [dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in rows[1:]]  # (the |---| line starts "|-")
    measured = {c["method"]: c for c in cells if c["source"] == "measured (synthetic)"}
    assert set(measured) == set(plan.models)
    for model, per in summary["scores"].items():
        assert measured[model]["testB gIoU (%, original)"] == f"{100 * per['testB']['gIoU']:.2f}"
    assert [c["method"] for c in cells if c["source"] == "reported"] == ["ReLA"]
    assert f"leaderboard: {tmp_path / 'leaderboard.md'}" in out


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        quickstart.main(workdir=tmp_path, task="nope")


def test_plan_overrides_reach_the_run_and_set_wins(tmp_path):
    import dataclasses

    assert plans.PLANS["gres"].model_overrides == plans.GRES_NT_HEAD == {}  # the empty-mask rule (measured)
    plan = dataclasses.replace(plans.PLANS["gres"], model_overrides={"eavl": {"nt_head": True}})
    assert plans.train_config("eavl", 2, plan, tmp_path, tmp_path).model_overrides == {"nt_head": True}
    assert plans.train_config("eavl", 2, plan, tmp_path, tmp_path, overrides={"nt_head": False}).model_overrides == {"nt_head": False}
    assert plans.train_config("blind", 2, plan, tmp_path, tmp_path).model_overrides == {}
    assert plans.train_config("eavl", 2, plans.PLANS["full"], tmp_path, tmp_path).model_overrides == {}
