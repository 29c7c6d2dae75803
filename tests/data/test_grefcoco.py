"""gRefCOCO raw reading (refbench.data.sources.grefer) through `refbench prepare`: every ann_id variant, crowd,
no-target, absent splits, the pickle, and each bad input refused with one line (or skipped)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refbench.data import prepare
from refbench.errors import RefbenchError

W, H = 60, 40
BOXES = {  # ann_id -> (image_id, [x0, y0, x1, y1], iscrowd)
    11: (1, [2, 2, 20, 20], 0), 12: (1, [30, 5, 50, 30], 0), 13: (1, [5, 25, 15, 38], 1), 14: (1, [40, 32, 55, 38], 1),
    21: (2, [10, 10, 30, 30], 0), 22: (2, [35, 10, 55, 35], 1),
    31: (3, [0, 0, 10, 10], 0),
}


def _poly(b):
    x0, y0, x1, y1 = b
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _refs() -> list[dict]:
    s = iter(range(100, 200))

    def sents(*texts):
        return [{"sent_id": next(s), "sent": t, "raw": t.upper(), "tokens": t.split()} for t in texts]

    return [
        {"ref_id": 1, "image_id": 1, "ann_id": 11, "category_id": 1, "split": "train", "sentences": sents("left square")},
        {"ref_id": 2, "image_id": 1, "ann_id": [11, 12], "category_id": [1, 2], "split": "train",
         "sentences": sents("both shapes", "the two shapes")},
        {"ref_id": 3, "image_id": 1, "ann_id": [-1], "category_id": -1, "split": "train", "sentences": sents("the green star")},
        {"ref_id": 4, "image_id": 1, "ann_id": [11, 13], "category_id": [1, 1], "split": "val", "sentences": sents("every square")},
        {"ref_id": 5, "image_id": 2, "ann_id": -1, "category_id": [], "split": "val", "sentences": sents("a purple ring"),
         "no_target": False},  # disagrees with ann_id: counted, ann_id trusted
        {"ref_id": 6, "image_id": 2, "ann_id": [21], "category_id": "whatever", "split": "val", "sentences": sents("the square"),
         "no_target": False},
        {"ref_id": 7, "image_id": 3, "ann_id": [-1], "category_id": None, "split": "val", "sentences": sents("the blue cross"),
         "no_target": True},
    ]


def write_raw(root: Path, refs: list[dict] | None = None, pickle_refs: bool = False) -> Path:
    """A tiny raw gRefCOCO under root: grefcoco/grefs(unc).json (or .p), instances.json, images."""
    (root / "grefcoco").mkdir(parents=True)
    img_dir = root / "images" / "train2014"
    img_dir.mkdir(parents=True)
    images = []
    for iid in (1, 2, 3):
        name = f"COCO_train2014_{iid:012d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(np.full((H, W, 3), 40 * iid, np.uint8)).save(buf, "JPEG")
        (img_dir / name).write_bytes(buf.getvalue())
        images.append({"id": iid, "file_name": name, "height": H, "width": W})
    anns = []
    for aid, (iid, b, crowd) in BOXES.items():
        seg = _poly(b)
        if crowd:
            m = np.zeros((H, W), np.uint8, order="F")
            m[b[1]:b[3], b[0]:b[2]] = 1
            rle = mask_utils.encode(m)
            seg = {"size": [H, W], "counts": rle["counts"].decode()}
        anns.append({"id": aid, "image_id": iid, "category_id": 1 + aid % 2, "iscrowd": crowd, "segmentation": seg,
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": 1.0})
    inst = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]}
    (root / "grefcoco" / "instances.json").write_text(json.dumps(inst))
    refs = _refs() if refs is None else refs
    if pickle_refs:
        (root / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    else:
        (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root


def _rect(b) -> np.ndarray:
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(_poly(b), H, W)))
    return m


def _shard_refs(out: Path) -> dict[int, dict]:
    refs = {}
    for tar in sorted((out / "grefcoco_unc").glob("*/*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    for r in json.loads(t.extractfile(m).read())["refs"]:
                        refs[r["ref_id"]] = r
    return refs


@pytest.mark.parametrize("pickled", [False, True])
def test_every_variant(tmp_path, capsys, pickled):
    data = write_raw(tmp_path / "data", pickle_refs=pickled)
    out = tmp_path / "shards"
    manifests = prepare.main(dataset="grefcoco", split_by="unc", data=data, out=out, workers=1)
    m = manifests["grefcoco_unc"]
    assert m["dataset"] == "grefcoco" and m["tokenizer"]["context_length"] == 17
    assert m["gres"]["absent_splits"] == ["testA", "testB"]
    assert m["gres"]["no_target_key_disagreements"] == {"count": 1, "first": [5]}
    assert m["splits"]["train"]["sentences"] == 4 and m["splits"]["val"]["sentences"] == 4
    assert "absent" in capsys.readouterr().out
    refs = _shard_refs(out)
    decode = lambda r: mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})  # noqa: E731
    # int ann_id: one target, the annotation's mask
    assert refs[1]["ann_id"] == [11] and not refs[1]["no_target"]
    assert np.array_equal(decode(refs[1]), _rect(BOXES[11][1]))
    # list: the union of both, both targets with their boxes
    assert np.array_equal(decode(refs[2]), _rect(BOXES[11][1]) | _rect(BOXES[12][1]))
    assert [t["ann_id"] for t in refs[2]["targets"]] == [11, 12]
    assert refs[2]["targets"][1]["bbox"] == [30.0, 5.0, 20.0, 25.0]
    assert refs[2]["bbox"] == [2.0, 2.0, 48.0, 28.0]
    # [-1] and -1: no target, empty mask, category_id not used
    for rid in (3, 5, 7):
        assert refs[rid]["no_target"] and refs[rid]["ann_id"] == [-1] and refs[rid]["targets"] == []
        assert decode(refs[rid]).sum() == 0 and refs[rid]["category_id"] == [] and refs[rid]["bbox"] is None
    # crowd in a multi-target ref: kept in targets (iscrowd 1), left out of the mask
    assert [(t["ann_id"], t["iscrowd"]) for t in refs[4]["targets"]] == [(11, 0), (13, 1)]
    assert np.array_equal(decode(refs[4]), _rect(BOXES[11][1]))
    assert all(len(s["tokens"]) == 17 for r in refs.values() for s in r["sentences"])


def test_all_finds_grefcoco(tmp_path):
    data = write_raw(tmp_path / "data")
    manifests = prepare.main(all_=True, data=data, out=tmp_path / "shards", workers=1)
    assert list(manifests) == ["grefcoco_unc"]


BAD = [
    ("names no annotation", lambda refs: refs[0].update(ann_id=[11, 99]), "ref 1", "ann_id 99 is not in"),
    ("-1 mixed with ids", lambda refs: refs[1].update(ann_id=[-1, 12]), "ref 2", "mixes -1"),
    ("another image's annotation", lambda refs: refs[5].update(ann_id=[21, 31]), "ref 6", "belongs to image 3"),
    ("all crowd", lambda refs: refs[5].update(ann_id=[22]), "ref 6", "is crowd"),
    ("all crowd, multi", lambda refs: refs[3].update(ann_id=[13, 14]), "ref 4", "is crowd"),
    ("duplicate sent_id", lambda refs: refs[2]["sentences"][0].update(sent_id=100), "sentence 100", "already used"),
]


@pytest.mark.parametrize("name, edit, who, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_nothing_published(tmp_path, name, edit, who, words):
    refs = _refs()
    edit(refs)
    data = write_raw(tmp_path / "data", refs)
    out = tmp_path / "shards"
    with pytest.raises(RefbenchError) as e:
        prepare.main(dataset="grefcoco", data=data, out=out, workers=1)
    msg = str(e.value)
    assert "\n" not in msg and who in msg and "grefs(unc).json" in msg
    if words:
        assert words in msg
    assert not out.exists() or not any(out.rglob("*"))
    m = prepare.main(dataset="grefcoco", data=data, out=out, workers=1, skip_bad=True)["grefcoco_unc"]
    assert m["skipped"] and m["skipped"][0]["kind"] == who.split()[0] and str(m["skipped"][0]["id"]) == who.split()[1]


def test_cli_error_is_one_line(tmp_path):
    from click.testing import CliRunner

    from refbench.cli import cli

    refs = _refs()
    refs[0]["ann_id"] = [-1, 11]
    data = write_raw(tmp_path / "data", refs)
    res = CliRunner().invoke(cli, ["prepare", "--dataset", "grefcoco", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "ref 1" in lines[0]
