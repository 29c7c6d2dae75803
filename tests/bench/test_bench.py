"""`refbench bench` prepare, loader, shards and eval (the refbench.bench package) at a tiny size.

Smoke tests of what each benchmark reports, never of timings: the floor writes the same images
per shard as prepare, the refer-style baseline loader yields the same tensors as ours, the byte
counts are the files' sizes, the eval share comes from wrapped metric functions. The model
benchmark is covered by tests/bench/test_model_bench.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from refbench import bench
from refbench.bench import baselines, common, runs
from refbench.data import shards as data
from refbench.data import train_stream, transforms
from refbench.data.sources import refer
from refbench.eval import metrics

IMAGES = 20  # the smallest synthetic set; every split non-empty


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """Settings over a bench workdir holding both synthetic sets, raw and prepared (shared by the tests below)."""
    s = bench.BenchSettings(workdir=tmp_path_factory.mktemp("bench"), images=IMAGES)
    for name in s.sets:
        common.prepared_set(s, name)
    return s


@pytest.fixture
def workdir(settings):
    return settings.workdir


@pytest.fixture
def one_rep(settings):
    """One timed repetition, no warm-up, tiny loader batches: seconds, not minutes."""
    return dataclasses.replace(settings, prepare_reps=1, prepare_warmup=0, loader_settings=((64, 4, 1, 1),),
                               loader_warmup=1, eval_reps=1, eval_warmup=0)


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_synth_sets_are_reused_and_coco_like(settings):
    raw = common.synth_set(settings, "coco-like")
    stamp = (raw / "SYNTH.json").stat().st_mtime_ns
    assert common.synth_set(settings, "coco-like") == raw  # matching SYNTH.json: not regenerated
    assert (raw / "SYNTH.json").stat().st_mtime_ns == stamp
    inst = refer.load_instances(raw / "refcoco" / "instances.json")
    assert {im["width"] for im in inst.images.values()} == {640}
    assert all(427 <= im["height"] <= 480 for im in inst.images.values())
    sizes = [p.stat().st_size for p in (raw / "images" / "train2014").glob("*.jpg")]
    assert 100e3 < np.mean(sizes) < 250e3  # COCO train2014 averages ~160 KB


def test_prepare_bench_floor_writes_the_same_images_per_shard(workdir, one_rep):
    rows = runs.bench_prepare(one_rep)
    assert [r["bench"] for r in rows] == ["prepare"] * 2 * len(one_rep.sets)
    wall, cpu = rows[0], rows[1]
    assert "coco-like" in wall["what"] and "wall" in wall["what"] and "CPU" in cpu["what"]
    assert wall["target"] == "<= 1.5" and wall["ok"] == (wall["ratio"] <= 1.5)
    assert all(r["target"] is None for r in rows[1:])  # only the representative set carries the target
    for r in rows:
        assert r["ours"] > 0 and r["baseline"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])  # one repetition: the ratio of the two
    for name in one_rep.sets:  # the floor's tars hold the JPEG bytes of prepare's shards, member for member
        manifest = data.load_manifest(workdir / f"shards-{name}-{IMAGES}" / "refcoco_unc")
        for shard in manifest["shards"]:
            ours = _members(workdir / f"shards-{name}-{IMAGES}" / "refcoco_unc" / shard["path"])
            floor = _members(workdir / f"floor-{name}-{IMAGES}" / shard["path"])
            assert floor == {k: v for k, v in ours.items() if k.endswith(".jpg")}
            assert len(floor) == shard["samples"]


def test_refer_style_loader_yields_what_train_loader_yields(settings, workdir):
    size = 96  # default synth images are ~250 x 200 px: ours decodes at 3/8..4/8 DCT scale, the baseline fully
    raw = common.synth_set(settings, "default")
    base = baselines.ReferStyleDataset(raw, "refcoco", "unc", "train", size)
    index = {r["ref_id"]: i for i, r in enumerate(base.refs)}
    batch = next(iter(train_stream.train_loader(workdir / f"shards-default-{IMAGES}" / "refcoco_unc", batch_size=6, image_size=size)))
    for b, (ref_id, sent_id) in enumerate(zip(batch["ref_id"].tolist(), batch["sent_id"].tolist())):
        i = index[ref_id]
        k = [s["sent_id"] for s in base.refs[i]["sentences"]].index(sent_id)
        item = base.item(i, k)
        assert item["sent_id"] == sent_id
        assert torch.equal(item["tokens"], batch["tokens"][b])
        assert torch.equal(item["mask"], batch["mask"][b].float())
        ours = data.to_device(batch, "cpu")["image"][b]  # float [3, S, S], normalised as the model sees it
        assert torch.equal(ours == 0, item["image"] == 0)  # the same letterbox: padding exactly where theirs is
        std = torch.tensor(transforms.CLIP_STD).view(3, 1, 1)
        levels = ((ours - item["image"]) * std * 255).abs()  # grey levels
        # the same picture through another filter (the IDCT's downscaling vs PIL's bilinear): a few
        # grey levels on average, more only along sharp edges
        content = levels[:, ours[0] != 0]  # [3, pixels of the image]
        assert content.mean() < 4.0 and (content > 32).float().mean() < 0.02
    # a DataLoader over it batches like ours
    loader = torch.utils.data.DataLoader(base, batch_size=3)
    b = next(iter(loader))
    assert b["image"].shape == (3, 3, size, size) and b["mask"].shape == (3, 1, size, size)
    assert b["tokens"].shape == (3, 17) and b["tokens"].dtype == torch.int64


def test_loader_bench_row(one_rep):
    (row,) = runs.bench_loader(one_rep)
    assert row["bench"] == "loader" and "64 px" in row["what"] and "batch 4" in row["what"]
    assert row["ours"] > 0 and row["baseline"] > 0
    assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    assert row["target"] == ">= 3.0" and row["ok"] == (row["ratio"] >= 3.0)  # a floor, not a ceiling
    assert torch.get_num_threads() >= 1


def test_shards_bench_counts_the_files(settings, workdir, tmp_path):
    log = tmp_path / "bench.jsonl"
    rows = bench.main(which=("shards",), settings=dataclasses.replace(settings, log=log))
    assert [r["bench"] for r in rows] == ["shards"] * len(settings.sets)
    for name, r in zip(settings.sets, rows):
        folder = workdir / f"shards-{name}-{IMAGES}" / "refcoco_unc"
        on_disk = sum(p.stat().st_size for p in folder.glob("*/*.tar"))
        assert r["ours"] == pytest.approx(on_disk / 1e6)
        raw = baselines.raw_bytes(workdir / f"synth-{name}-{IMAGES}", "refcoco", "unc")
        assert r["baseline"] == pytest.approx((raw["jpeg"] + raw["png"]) / 1e6)
        jpegs = sum(p.stat().st_size for p in (workdir / f"synth-{name}-{IMAGES}" / "images" / "train2014").glob("*.jpg"))
        assert raw["jpeg"] == jpegs  # every synthetic image has refcoco refs
        assert raw["png"] > 0
    assert rows[0]["target"] == "<= 1.1" and rows[1]["target"] is None
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["rows"] == rows and record["cores"] >= 1 and len(record["load_average"]) == 3


def test_png_mask_round_trips():
    mask = np.zeros((7, 9), np.uint8)
    mask[2:5, 3:8] = 1
    png = baselines.png_mask(mask)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), mask * 255)


def test_time_spent_in_wraps_and_restores():
    original = metrics.summarize
    with common.time_spent_in((("refbench.eval.metrics", "summarize"), ("refbench.eval.metrics", "as_counts"))) as spent:
        assert metrics.summarize is not original
        assert metrics.summarize([1, 2], [2, 2])["mIoU"] == pytest.approx(0.75)  # still the real function
        first = spent[0]
        assert first > 0
        metrics.as_counts([1], [2])  # called on its own it counts; inside summarize it was not counted twice
    assert metrics.summarize is original and spent[0] > first


def test_eval_bench_share(workdir, one_rep, capsys):
    (row,) = runs.bench_eval(one_rep)
    assert capsys.readouterr().out == ""  # the evaluation API prints nothing
    assert row["bench"] == "eval" and "tiny EAVL" in row["what"] and "protocol original" in row["what"]
    assert 0 < row["ours"] < row["baseline"]  # metric seconds inside eval wall seconds
    assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    assert row["target"] == "<= 0.05" and row["ok"] == (row["ratio"] <= 0.05)
    assert not (workdir / "eval-results").exists()  # its records are scratch
    assert (workdir / "eval-tiny-eavl.pt").is_file()
