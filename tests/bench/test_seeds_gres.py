"""`refbench bench seeds --task gres`: one seed, two steps, on the small gRefCOCO plan: EAVL with
and without its no-target head and blind once, a table of gIoU / cIoU / N-acc / T-acc per model,
rule and split, written to seeds-gres.md / .json."""

from __future__ import annotations

import dataclasses
import json

from refbench.bench import seeds
from refbench.train import plans


def test_gres_seed_table_one_seed(tmp_path, monkeypatch):
    small = dataclasses.replace(plans.PLANS["gres-fast"], steps=2)
    monkeypatch.setitem(plans.PLANS, "gres", small)  # the small data, not the full plan's 2,000 images
    settings = seeds.SeedSettings(models=("eavl", "blind"), seeds=(0,), steps=2, overrides=(), isa="native",
                                  workdir=tmp_path, splits=("val",), lanes=2, task="gres")
    table = seeds.main(settings)
    assert [r["model"] for r in table["rows"]] == ["eavl+nt_head=True", "eavl+nt_head=False", "blind"]
    for r in table["rows"]:
        assert r["split"] == "val" and set(seeds.GRES_KEYS) <= set(r)
    md = (tmp_path / "seeds-gres.md").read_text()
    assert "gRefCOCO protocol original" in md and "N-acc" in md and "synthetic grefcoco_unc" in md
    assert json.loads((tmp_path / "seeds-gres.json").read_text())["task"] == "gres"


def test_set_nt_head_picks_one_rule():
    assert seeds.gres_variants("cris", {"nt_head": False}) == [{"nt_head": False}]
    assert seeds.gres_variants("blind", {}) == [{}]
