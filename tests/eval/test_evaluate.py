"""`refbench eval`, `refbench leaderboard` and `refbench predict` end to end, on a tiny
EAVL checkpoint and the synthetic shards of tests/conftest.py: one record per split whose
metrics its own per-sentence sidecar reproduces, every sentence once, both protocols named,
overlay pictures, every leaderboard export, single-image predict, and a 2-rank torchrun eval
that gives exactly the single-process I/U.

The checkpoint is `init_run` (the seeded init, which predicts non-empty masks), so I and U are
informative; `tests/train/test_train.py` evaluates a trained one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _harness import DATASET, assert_cli_ok, assert_ok, cli, torchrun
from PIL import Image

from refbench.data import shards as data
from refbench.data.sources import refer
from refbench.eval import diversity, evaluate, metrics, results, visualize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split_sent_ids(synth_root, split: str) -> list[int]:
    refs = refer.load_refs(synth_root / "refcoco" / "refs(unc).p")
    return sorted(s["sent_id"] for r in refs if r["split"] == split for s in r["sentences"])


def _records(root, split: str) -> list[results.Record]:
    return [results.load_record(p) for p in sorted((root / DATASET / split).glob("*.json"))]


@pytest.fixture(scope="module")
def evaluated(init_run, shards_root, tmp_path_factory):
    """`refbench eval --split all --vis 3` of `init_run`: (results root, CLI result)."""
    root = tmp_path_factory.mktemp("results")
    result = cli("eval", "--checkpoint", init_run / "best.pt", "--shards", shards_root, "--split", "all",
                 "--vis", "3", "--results", root)
    assert_cli_ok(result)
    return root, result


def test_one_valid_record_per_split_with_every_sentence(evaluated, init_run, shards_root, synth_root):
    root, result = evaluated
    manifest = data.load_manifest(shards_root / DATASET)
    splits = [s for s in manifest["splits"] if s != "train"]
    assert sorted(p.name for p in (root / DATASET).iterdir()) == sorted(splits)
    for split in splits:
        (rec,) = _records(root, split)  # load_record recomputes every metric from the sidecar
        assert rec.split == split and rec.protocol["name"] == "original"
        assert rec.metrics["n"] == manifest["splits"][split]["sentences"] == rec.sentences.height
        assert rec.sentences["sent_id"].sort().to_list() == _split_sent_ids(synth_root, split)
        summary = metrics.summarize(rec.sentences["I"].to_numpy(), rec.sentences["U"].to_numpy())
        assert all(summary[k] == rec.metrics[k] for k in ("n", "mIoU", "oIoU", *metrics.PR_KEYS))
        assert rec.sentences["I"].sum() > 0 and (rec.sentences["U"] > 0).all()  # informative counts
        assert rec.model["name"] == "eavl" and rec.model["run"] == init_run.name
        assert rec.meta["data"]["sentences_expected"] == rec.metrics["n"]
        assert split in result.stdout and str(rec.metrics["n"]) in result.stdout  # the table names it
        qd = rec.extras["query_diversity"]  # EAVL has queries: their diversity is kept with the record
        assert qd["n"] == rec.metrics["n"] and set(qd) == {"n", *diversity.KEYS}
        assert -1.0 <= qd["query_mask_corr"] <= 1.0 and 0.0 < qd["query_weight_entropy"] <= 1.0
    assert "query diversity" in result.stdout and "mask correlation" in result.stdout


def test_vis_draws_best_worst_and_random_with_query_grids(evaluated, synth_root):
    root, _ = evaluated
    images = refer.load_instances(synth_root / "refcoco" / "instances.json").images
    (rec,) = _records(root, "testB")
    folder = evaluate.results_dir_for(rec.path)
    overlays = sorted(p for p in folder.glob("*.png") if not p.name.endswith("-queries.png"))
    assert sorted(p.name.split("-")[0] for p in overlays) == ["best", "random", "worst"]
    rows = {r["sent_id"]: r for r in rec.sentences.iter_rows(named=True)}
    for path in overlays:
        sent_id = int(path.stem.rsplit("sent", 1)[1])
        row = rows[sent_id]
        im = images[row["image_id"]]
        with Image.open(path) as picture:
            assert picture.size == (im["width"], im["height"] + visualize.caption_height(im["width"]))
        grid = path.with_name(f"{path.stem}-queries.png")
        with Image.open(grid) as picture:
            assert picture.size == visualize.grid_size((im["width"], im["height"]), 24)  # EAVL tiny: 24 queries
        if path.name.startswith("best"):
            assert row["IoU"] == rec.sentences["IoU"].max()
        if path.name.startswith("worst"):
            assert row["IoU"] == rec.sentences["IoU"].min()


@pytest.mark.parametrize("protocol", ["original", "cris"])
def test_pictures_redraw_the_scored_masks(init_run, shards_root, tmp_path, protocol):
    """`eval --vis` and `predict` re-run the model for their pictures with the scored protocol's
    preprocessing and way back (CRIS's OpenCV warp for `cris`), so a picture's mask has exactly
    the I and U of its sentence in the record (eval at batch 1: the same forward, sentence by sentence)."""
    import io

    import torch

    from refbench import checkpoint
    from refbench.data import cvwarp

    root = tmp_path / "results"
    assert_cli_ok(cli("eval", "--checkpoint", init_run / "best.pt", "--shards", shards_root, "--split", "testB",
                      "--protocol", protocol, "--batch-size", "1", "--workers", "0", "--results", root))
    (rec,) = _records(root, "testB")
    scored = {r["sent_id"]: (r["I"], r["U"]) for r in rec.sentences.iter_rows(named=True)}
    ckpt = checkpoint.load(init_run / "best.pt")
    net = checkpoint.build_model(ckpt, init_run / "best.pt").eval()
    preprocess = metrics.get_protocol(protocol).preprocess
    redrawn, letterboxed = {}, {}  # the pictures' I/U; and with refbench's letterbox whatever the protocol
    manifest = data.load_manifest(shards_root / DATASET)
    for sample in data.split_samples(manifest, shards_root / DATASET, "testB"):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        rgb = cvwarp.decode_rgb(sample["jpg"]) if preprocess == "cris" else None
        for ref in json.loads(sample["json"])["refs"]:
            gt = refer.decode_mask(ref["mask"]).astype(bool)
            for s in ref["sentences"]:
                for preprocessing, out in ((preprocess, redrawn), ("letterbox", letterboxed)):
                    pred = visualize._predict_one(net, image, s["tokens"], torch.device("cpu"),
                                                  preprocess=preprocessing, rgb=rgb if preprocessing == "cris" else None,
                                                  jpeg=sample["jpg"] if preprocessing == "letterbox" else None)
                    mask = pred["prob"] > net.threshold
                    out[s["sent_id"]] = (int((mask & gt).sum()), int((mask | gt).sum()))
    assert redrawn == scored
    # the letterbox draws other masks than CRIS's chain scores (what the pictures showed before)
    assert (letterboxed == scored) == (protocol == "original")


@pytest.mark.parametrize("fmt", ["md", "csv", "json", "html"])
def test_leaderboard_exports_contain_the_record(evaluated, init_run, tmp_path, fmt):
    root, _ = evaluated
    (rec,) = _records(root, "testB")
    out = tmp_path / f"board.{fmt}"
    assert_cli_ok(cli("leaderboard", "--results", root, "--format", fmt, "--out", out))
    text = out.read_text()
    assert init_run.name in text
    miou = f"{100 * rec.metrics['mIoU']:.2f}"
    column = f"testB mIoU (%, {rec.protocol['name']})"
    if fmt in ("csv", "json"):  # full precision there: compare the number, not a rounded substring
        import polars as pl

        values = (pl.read_csv(out)[column].to_list() if fmt == "csv"
                  else [r.get(column) for r in json.loads(text)["rows"]])
        assert any(v is not None and abs(v - 100 * rec.metrics["mIoU"]) < 1e-6 for v in values), (miou, values)
        assert fmt == "csv" or init_run.name in json.dumps(json.loads(text))
        return
    # md rounds to 2 decimals; the html page may carry the full-precision value inline
    assert miou in text or str(100 * rec.metrics["mIoU"])[:5] in text, (miou, text[:2000])


def test_input_protocol_is_named_and_differs(init_run, evaluated, shards_root, tmp_path):
    root, _ = evaluated
    assert_cli_ok(cli("eval", "--checkpoint", init_run / "best.pt", "--shards", shards_root, "--split", "testB",
                      "--protocol", "input", "--results", tmp_path, "--workers", "0"))
    (rec,) = _records(tmp_path, "testB")
    (orig,) = _records(root, "testB")
    want = metrics.get_protocol("input")
    assert (rec.protocol["name"], rec.protocol["version"]) == (want.name, want.version)
    assert orig.protocol["name"] == "original"
    assert rec.metrics["n"] == orig.metrics["n"]
    a, b = orig.sentences.sort("sent_id"), rec.sentences.sort("sent_id")
    assert a["sent_id"].to_list() == b["sent_id"].to_list()
    assert a["U"].to_list() != b["U"].to_list()  # counted at the network input (128 px), not the original size


def test_predict_writes_mask_and_overlay(init_run, synth_root, tmp_path):
    image = sorted((synth_root / "images" / "train2014").glob("*.jpg"))[0]
    out = tmp_path / "out" / "mask.png"
    result = cli("predict", "--checkpoint", init_run / "best.pt", "--image", image, "--text", "the red circle on the left",
                 "--out", out)
    assert_cli_ok(result)
    with Image.open(image) as im:
        size = im.size
    with Image.open(out) as mask:
        assert mask.mode == "L" and mask.size == size
        values = set(np.unique(np.asarray(mask)).tolist())
    assert values <= {0, 255} and 255 in values  # the untrained model predicts a non-empty mask
    with Image.open(out.with_name("mask-overlay.png")) as picture:
        assert picture.size == (size[0], size[1] + visualize.caption_height(size[0]))
    with Image.open(out.with_name("mask-queries.png")) as picture:
        assert picture.size == visualize.grid_size(size, 24)
    assert "predicted mask" in result.stdout


def test_torchrun_eval_gives_the_single_process_iu(init_run, small_shards_root, tmp_path):
    # batch 1: a forward's float rounding depends on which sentences share its batch (and ranks
    # batch different sentences together), which can flip a pixel sitting on the threshold
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ("--checkpoint", init_run / "best.pt", "--shards", small_shards_root, "--split", "all", "--workers", "0",
            "--batch-size", "1")
    assert_cli_ok(cli("eval", *args, "--results", single))
    # --vis under torchrun: rank 0 draws from every shard of the split while the others wait
    # (webdataset's default nodesplitter refuses WORLD_SIZE > 1; the pictures must not use it)
    assert_ok(torchrun(2, "eval", *args, "--results", ddp, "--vis", "2"))
    manifest = data.load_manifest(small_shards_root / DATASET)
    for split in (s for s in manifest["splits"] if s != "train"):
        assert list(evaluate.results_dir_for(_records(ddp, split)[0].path).glob("*.png")), split
        assert manifest["splits"][split]["shards"] >= 2  # (one shard: tests/train/test_ddp.py)
        (a,), (b,) = _records(single, split), _records(ddp, split)
        assert a.metrics["n"] == b.metrics["n"] == manifest["splits"][split]["sentences"]
        frame_a, frame_b = a.sentences.sort("sent_id"), b.sentences.sort("sent_id")
        assert frame_a.equals(frame_b), split
        assert {k: a.metrics[k] for k in ("mIoU", "oIoU")} == {k: b.metrics[k] for k in ("mIoU", "oIoU")}
        qa, qb = a.extras["query_diversity"], b.extras["query_diversity"]  # gathered over the ranks
        assert qa["n"] == qb["n"] == a.metrics["n"]
        assert all(qa[k] == pytest.approx(qb[k], abs=1e-5) for k in diversity.KEYS)
