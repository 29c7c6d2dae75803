"""`refbench bench seeds` and the side-by-side runner under it (refbench.train.sidebyside): the seed
table's statistics, the live progress lines, a short end-to-end table, the other CPU kind's
kernels in the children, and (slow) the same seed on both CPU kinds giving the same testB."""

from __future__ import annotations

import json
import statistics

import pytest
from _harness import assert_cli_ok, cli
from rich.console import Console

from refbench.bench import seeds
from refbench.errors import RefbenchError
from refbench.train import sidebyside


def test_parse_seeds():
    assert seeds.parse_seeds("0-3") == (0, 1, 2, 3)
    assert seeds.parse_seeds("0,2,5") == (0, 2, 5)
    assert seeds.parse_seeds("4") == (0, 1, 2, 3)
    for bad in ("", "a", "3-1", "1,1", "-2"):
        with pytest.raises(RefbenchError, match="--seeds"):
            seeds.parse_seeds(bad)


def test_summary_of_seeds():
    per_seed = {s: {"mIoU": v, "sos_attention": a, "capability": "AVX512"}
                for s, v, a in [(0, 0.5, 0.1), (1, 0.6, 0.3), (2, 0.55, 0.2), (3, 0.65, 0.0)]}
    row = seeds.summarize(per_seed)
    assert row["mean"] == pytest.approx(0.575) and row["sd"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.55, 0.65]))
    lo, hi = row["ci95"]
    assert 0.5 <= lo < 0.575 < hi <= 0.65  # the interval of the mean lies inside the seeds' range
    assert row["sos_attention"]["max"] == pytest.approx(0.3) and row["sos_attention"]["mean"] == pytest.approx(0.15)
    assert "kernel_sensitivity" not in row  # a figure some seed lacks is left out
    assert seeds.bootstrap_mean_ci([0.4]) == (0.4, 0.4)
    assert seeds.run_tag("eavl", {"scaled_attention": True, "attend_sos": False}) == \
        "eavl+attend_sos=False+scaled_attention=True"


def test_progress_lines_say_step_rate_and_eta(tmp_path):
    assert sidebyside.progress_line("eavl", 120, 600, 32.0, 32) == "eavl  step 120/600 (20%)  32.0 samples/s  ETA 8:00"
    assert sidebyside.progress_line("cris", 0, 600, 0.0, 32, width=6) == "cris    step 0/600 (0%)  0.0 samples/s  ETA -:--"
    run = tmp_path / "run"
    run.mkdir()
    assert sidebyside.logged_progress(run) == (0, 0.0)
    (run / "log.jsonl").write_text(json.dumps({"step": 10, "samples_per_s": 50.0}) + "\n"
                                   + json.dumps({"step": 10, "note": "x"}) + "\n" + '{"step": 2')  # a torn last line
    assert sidebyside.logged_progress(run) == (10, 50.0)


@pytest.fixture(scope="module")
def short_table(tmp_path_factory):
    """`refbench bench seeds blind --seeds 2 --steps 3 --split testB --isa avx2`: the quickstart's
    data, two 3-step runs on AVX2 kernels, printed to a file (not a terminal)."""
    workdir = tmp_path_factory.mktemp("seeds")
    result = cli("bench", "seeds", "blind", "--seeds", "2", "--steps", "3", "--split", "testB", "--isa", "avx2",
                 "--workdir", workdir)
    assert_cli_ok(result)
    return workdir, result


def test_seed_table_end_to_end(short_table):
    workdir, result = short_table
    table = json.loads((workdir / "seeds.json").read_text())
    (row,) = table["rows"]
    assert row["model"] == "blind" and row["split"] == "testB" and row["seeds"] == [0, 1]
    assert set(row["mIoU"]) == {"0", "1"} and 0.0 <= row["mean"] <= 1.0
    assert row["mask_sensitivity"]["max"] == 0.0 and row["kernel_sensitivity"]["max"] == 0.0  # blind reads no sentence
    assert table["plan"]["synthetic"] is True and table["plan"]["steps"] == 3
    md = (workdir / "seeds.md").read_text()
    assert "| blind | testB |" in md and "synthetic refcoco_unc" in md
    for seed in (0, 1):
        assert (workdir / "runs" / "avx2" / "blind" / f"seed{seed}" / "best.pt").is_file()
    assert "blind seed 0" in result.output and "refbench bench seeds" in result.output


def test_avx2_children_run_avx2_kernels(short_table):
    """--isa avx2 reaches the training processes: torch reports the capability they ran with."""
    workdir, _ = short_table
    (row,) = json.loads((workdir / "seeds.json").read_text())["rows"]
    assert row["capability"] == ["AVX2"]


def test_a_second_call_reuses_the_runs(short_table):
    workdir, _ = short_table
    before = (workdir / "runs" / "avx2" / "blind" / "seed0" / "best.pt").stat().st_mtime_ns
    again = cli("bench", "seeds", "blind", "--seeds", "1", "--steps", "3", "--split", "testB", "--isa", "avx2",
                "--workdir", workdir)
    assert_cli_ok(again)
    assert "reused" in again.output
    assert (workdir / "runs" / "avx2" / "blind" / "seed0" / "best.pt").stat().st_mtime_ns == before
    assert len((workdir / "seeds.jsonl").read_text().splitlines()) == 2


def test_unknown_field_is_refused_before_any_work(tmp_path):
    result = cli("bench", "seeds", "eavl", "--set", "no_such_field=1", "--workdir", tmp_path / "w")
    assert result.exit_code == 2 and "no_such_field" in result.output
    assert not (tmp_path / "w").exists()


CROSS_ISA_STEPS = 300  # the slow cross-ISA test's plan: the quickstart's data, batch and recipe, 300 steps


@pytest.mark.slow
def test_the_same_seed_on_both_cpu_kinds_gives_the_same_testb(tmp_path):
    """Issue 25: seed 0 trained on AVX-512 kernels and on AVX2 kernels (the other CPU kind's, on
    this machine) gives testB mIoU within 1.0 point for every quickstart model. Skipped where the
    CPU has no AVX-512 (both runs would take the AVX2 path)."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512: both kinds would run the same kernels")
    tables = {}
    for isa in ("native", "avx2"):
        settings = seeds.SeedSettings(models=("eavl", "cris", "blind"), seeds=(0,), steps=CROSS_ISA_STEPS,
                                      overrides=(), isa=isa, workdir=tmp_path, splits=("testB",), lanes=None)
        tables[isa] = {r["model"]: r for r in seeds.main(settings, console=Console(quiet=True))["rows"]}
    assert tables["avx2"]["eavl"]["capability"] == ["AVX2"] and tables["native"]["eavl"]["capability"] == ["AVX512"]
    for model in ("eavl", "cris", "blind"):
        native, avx2 = tables["native"][model]["mean"], tables["avx2"][model]["mean"]
        assert abs(native - avx2) <= 0.010, (model, native, avx2)
