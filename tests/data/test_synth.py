"""The synthetic REFER dataset (refbench.data.synth): layout, formats, splits, language and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refbench.data import text
from refbench.data.datasets import PARTITIONS
from refbench.data.sources import refer
from refbench.data.synth import generate as synth
from refbench.errors import RefbenchError

REF_KEYS = {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"}
SPLITS = {"unc": {"train", "val", "testA", "testB"}, "umd": {"train", "val", "test"}, "google": {"train", "val"}}
GROUP_OF = {cid: group for cid, _, group in synth.CATEGORIES}


@pytest.fixture(scope="module")
def loaded(synth_root):
    inst = refer.load_instances(synth_root / "refcoco" / "instances.json")
    refs = {f"{d}_{s}": refer.load_refs(synth_root / d / f"refs({s}).p") for d, s in PARTITIONS}
    return inst, refs


def test_layout_and_formats(synth_root, loaded):
    inst, refs = loaded
    for d, s in PARTITIONS:
        raw = (synth_root / d / f"refs({s}).p").read_bytes()
        assert raw[:2] == b"\x80\x02"  # pickle protocol 2, like the originals
        assert (synth_root / d / "instances.json").read_bytes() == (synth_root / "refcoco" / "instances.json").read_bytes()
    coco = json.loads((synth_root / "refcoco" / "instances.json").read_text())
    assert set(coco) >= {"images", "annotations", "categories"}
    assert {(c["id"], c["name"], c["supercategory"]) for c in coco["categories"]} == set(synth.CATEGORIES)
    image_ids = [im["id"] for im in coco["images"]]
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(image_ids)) == len(image_ids) == 48 and len(set(ann_ids)) == len(ann_ids)
    assert max(image_ids) > 1000 and max(ann_ids) > 10000 and sorted(image_ids) != list(range(1, 49))  # COCO-like ids
    for im in coco["images"]:
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        assert Image.open(synth_root / "images" / "train2014" / im["file_name"]).size == (im["width"], im["height"])
    shapes = {(im["width"] > im["height"]) for im in coco["images"]}
    assert shapes == {True, False}  # landscape and portrait
    per_image = {}
    for a in coco["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert a["iscrowd"] == 0 and a["category_id"] in GROUP_OF and len(a["bbox"]) == 4
        area = float(refer.decode_mask(refer.mask_rle(a["segmentation"], inst.images[a["image_id"]]["height"],
                                                      inst.images[a["image_id"]]["width"])).sum())
        assert a["area"] == area > 0
    assert set(per_image.values()) <= {3, 4, 5} and len(per_image) == 48  # every instance listed
    n_polys = {len(a["segmentation"]) for a in coco["annotations"]}
    assert n_polys == {1, 2}  # rings and crosses are two polygons

    for name, rs in refs.items():
        sent_ids = [s["sent_id"] for r in rs for s in r["sentences"]]
        assert len(set(sent_ids)) == len(sent_ids) and len({r["ref_id"] for r in rs}) == len(rs)
        per_img: dict[int, int] = {}
        for r in rs:
            assert set(r) == REF_KEYS
            ann = inst.anns[r["ann_id"]]
            assert ann["image_id"] == r["image_id"] and ann["category_id"] == r["category_id"]
            assert r["file_name"] == f"COCO_train2014_{r['image_id']:012d}_{r['ann_id']}.jpg"
            assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] and 1 <= len(r["sentences"]) <= 3
            for s in r["sentences"]:
                assert set(s) == {"tokens", "raw", "sent_id", "sent"}
                assert s["sent"] == synth.clean(s["raw"]) and s["tokens"] == s["sent"].split() and s["sent"]
            per_img[r["image_id"]] = per_img.get(r["image_id"], 0) + 1
        assert set(per_img.values()) <= {2, 3} and len(per_img) == 48, name
        assert any(s["raw"] != s["sent"] for r in rs for s in r["sentences"])  # case/punctuation variety


def test_overlapping_objects_exist(loaded):
    inst, _ = loaded
    by_image: dict[int, list] = {}
    for a in inst.anns.values():
        im = inst.images[a["image_id"]]
        by_image.setdefault(a["image_id"], []).append(refer.decode_mask(refer.mask_rle(a["segmentation"], im["height"], im["width"])))
    overlaps = sum(int((m1 & m2).any()) for ms in by_image.values() for i, m1 in enumerate(ms) for m2 in ms[i + 1:])
    assert overlaps >= 3


def test_splits_are_image_disjoint_and_testA_testB_are_the_two_groups(loaded):
    _, refs = loaded
    for name, rs in refs.items():
        split_by = name.rsplit("_", 1)[1]
        images: dict[str, set] = {}
        for r in rs:
            images.setdefault(r["split"], set()).add(r["image_id"])
        assert set(images) == SPLITS[split_by], name
        all_ids = [i for ids in images.values() for i in ids]
        assert len(all_ids) == len(set(all_ids)) == 48, name  # every image in exactly one split
        assert len(images["train"]) > 0.65 * 48
    for name in ("refcoco_unc", "refcoco+_unc"):
        for r in refs[name]:
            if r["split"] == "testA":
                assert GROUP_OF[r["category_id"]] == synth.GROUPS[0]
            if r["split"] == "testB":
                assert GROUP_OF[r["category_id"]] == synth.GROUPS[1]
    # RefCOCO+ shares RefCOCO's images and splits, as the real one does
    split_of = {r["image_id"]: r["split"] for r in refs["refcoco_unc"]}
    assert all(split_of[r["image_id"]] == r["split"] for r in refs["refcoco+_unc"])
    assert {r["ref_id"] for r in refs["refcocog_umd"]} == {r["ref_id"] for r in refs["refcocog_google"]}


def _words(refs):
    return [s["sent"].split() for r in refs for s in r["sentences"]]


def test_sentence_styles(loaded):
    _, refs = loaded
    coco_words = _words(refs["refcoco_unc"])
    assert all(not (set(w) & synth.LOCATION_WORDS) for w in _words(refs["refcoco+_unc"]))  # appearance only
    assert np.mean([bool(set(w) & synth.LOCATION_WORDS) for w in coco_words]) > 0.4  # location words are common
    assert np.mean([len(w) for w in coco_words]) < 5
    gref = [s["sent"] for r in refs["refcocog_umd"] for s in r["sentences"]]
    assert np.mean([len(s.split()) for s in gref]) >= 8
    _, n_tokens = text.tokenize_with_lengths(gref, 22)
    assert 0 < (n_tokens > 22).mean() < 0.2  # some, not most, G-Ref sentences are cut at 22 tokens


def _shape_of(sent: str) -> str | None:
    """The category a sentence names, if any (multi-word nouns first)."""
    nouns = sorted(((w, c) for c, ws in synth.SHAPE_WORDS.items() for w in ws), key=lambda wc: -len(wc[0]))
    padded = f" {sent} "
    for w, c in nouns:
        if f" {w} " in padded:
            return c
    return None


def test_refcocoplus_words_match_the_pixels(synth_root, loaded):
    """Colour and shape words name the target: its median pixel colour and its category."""
    inst, refs = loaded
    names, rgbs = list(synth.COLOURS), np.array(list(synth.COLOURS.values()), float)
    checked = 0
    for r in refs["refcoco+_unc"]:
        im = inst.images[r["image_id"]]
        pixels = np.asarray(Image.open(synth_root / "images" / "train2014" / im["file_name"]).convert("RGB"))
        m = refer.decode_mask(refer.mask_rle(inst.anns[r["ann_id"]]["segmentation"], im["height"], im["width"])).astype(bool)
        median = np.median(pixels[m], axis=0)
        colour = names[int(np.argmin(((rgbs - median) ** 2).sum(1)))]
        for s in r["sentences"]:
            said = [w for w in s["sent"].split() if w in synth.COLOURS]
            assert said in ([], [colour]), (s["sent"], colour)
            shape = _shape_of(s["sent"])
            assert shape in (None, inst.categories[r["category_id"]]), s["sent"]
            checked += bool(said)
    assert checked > 50


@pytest.fixture(scope="module")
def location_heavy(tmp_path_factory):
    """A set whose RefCOCO sentences favour location words (the generator's weights as data)."""
    import dataclasses

    root = tmp_path_factory.mktemp("synth-loc") / "data"
    cfg = dataclasses.replace(synth.SynthConfig(), location_weight=3.0, generic_weight=1.0, full_weight=0.7)
    synth.generate(root, 60, seed=0, cfg=cfg, workers=1)
    return refer.load_instances(root / "refcoco" / "instances.json"), {"refcoco_unc": refer.load_refs(root / "refcoco" / "refs(unc).p")}


def test_pure_location_sentences_pick_the_extreme_object(location_heavy):
    """"left one", "the shape on the right", "top thing": the target is that extreme of all objects."""
    inst, refs = location_heavy
    axes = {"left": (0, min), "right": (0, max), "top": (1, min), "upper": (1, min), "bottom": (1, max), "lower": (1, max)}
    centres: dict[int, dict[int, tuple]] = {}
    for a in inst.anns.values():
        x, y, w, h = a["bbox"]
        centres.setdefault(a["image_id"], {})[a["id"]] = (x + w / 2, y + h / 2)
    checked = 0
    for r in refs["refcoco_unc"]:
        for s in r["sentences"]:
            words = s["sent"].split()
            rel = [w for w in words if w in axes]
            if len(rel) != 1 or set(words) & (set(synth.COLOURS) | {"bigger", "smaller", "biggest", "smallest"}) or _shape_of(s["sent"]):
                continue
            axis, pick = axes[rel[0]]
            cs = centres[r["image_id"]]
            best = pick(cs, key=lambda k: cs[k][axis])
            assert best == r["ann_id"], s["sent"]
            checked += 1
    assert checked >= 10


def test_language_is_needed(loaded):
    """Blind guesses score low: the largest object, or all objects, against each unc ref's target."""
    inst, refs = loaded
    largest, union = [], []
    for r in refs["refcoco_unc"]:
        im = inst.images[r["image_id"]]
        masks = {a["id"]: refer.decode_mask(refer.mask_rle(a["segmentation"], im["height"], im["width"])).astype(bool)
                 for a in inst.anns.values() if a["image_id"] == r["image_id"]}
        target = masks[r["ann_id"]]
        big = max(masks.values(), key=lambda m: m.sum())
        every = np.logical_or.reduce(list(masks.values()))
        largest.append((big & target).sum() / (big | target).sum())
        union.append(target.sum() / every.sum())
    assert np.mean(largest) < 0.45 and np.mean(union) < 0.4, (np.mean(largest), np.mean(union))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    synth.generate(tmp_path / "a", 24, seed=3, workers=1)
    synth.generate(tmp_path / "b", 24, seed=3, workers=2)
    synth.generate(tmp_path / "c", 24, seed=4, workers=1)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert a.keys() != c.keys()


def test_rewrites_its_own_output_and_refuses_foreign_data(tmp_path):
    synth.generate(tmp_path / "d", 24, seed=0, workers=1)
    synth.generate(tmp_path / "d", 20, seed=1, workers=1)  # its own folder: rewritten, stale images gone
    assert len(list((tmp_path / "d" / "images" / "train2014").iterdir())) == 20
    assert json.loads((tmp_path / "d" / "SYNTH.json").read_text())["seed"] == 1
    real = tmp_path / "real"
    (real / "refcoco").mkdir(parents=True)
    (real / "refcoco" / "refs(unc).p").write_bytes(b"real data")
    with pytest.raises(RefbenchError) as e:
        synth.generate(real, 20, seed=0, workers=1)
    assert "not written by `refbench synth`" in e.value.message and str(real) in e.value.message
    assert (real / "refcoco" / "refs(unc).p").read_bytes() == b"real data"
    with pytest.raises(RefbenchError, match="at least 20"):
        synth.generate(tmp_path / "e", 5, seed=0)


def test_cli_synth(tmp_path):
    from click.testing import CliRunner

    from refbench.cli import cli

    result = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "s"), "--images", "20", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "refcoco_unc" in result.output and "testB" in result.output
    assert (tmp_path / "s" / "refcocog" / "refs(google).p").is_file()
