"""Raw REFER reading (refbench.data.sources.refer): the restricted unpickler, Python 2 pickles, the join and GT masks."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refbench.data.sources import refer
from refbench.errors import RefbenchError

# ------------------------------------------------------------------------------------ unpickler


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("how", ["os.system protocol 0", "os.system protocol 4", "builtins.eval protocol 2", "builtins.exec protocol 2"])
def test_pickle_that_runs_code_is_refused(tmp_path, how):
    import os

    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    if how == "os.system protocol 0":
        path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
        wanted = "os.system"
    elif how == "os.system protocol 4":
        path.write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=4))
        wanted = f"{os.system.__module__}.system"  # posix.system on Linux
    else:
        fn = eval if "eval" in how else exec
        path.write_bytes(pickle.dumps(_Evil(fn, f"open({str(marker)!r}, 'w').close()"), protocol=2))
        wanted = f"__builtin__.{fn.__name__}"  # protocol 2 names Python 2's module
    with pytest.raises(RefbenchError) as e:
        refer.load_refs(path)
    assert str(path) in e.value.message and wanted in e.value.message and "refused" in e.value.message
    assert not marker.exists()


def _py2_str(b: bytes) -> bytes:  # SHORT_BINSTRING: how Python 2 pickles a (byte) str
    return b"U" + bytes([len(b)]) + b


def _py2_unicode(s: str) -> bytes:  # BINUNICODE: a Python 2 unicode object
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _py2_refs_pickle(sent: bytes) -> bytes:
    """A protocol-2 pickle as Python 2 writes a refs list: one ref dict whose keys and texts are str bytes."""
    def kv(k, v):
        return _py2_str(k) + v
    sentence = b"}(" + kv(b"sent", _py2_str(sent)) + kv(b"raw", _py2_unicode("Café RED")) + kv(b"sent_id", b"K\x03") + \
        kv(b"tokens", b"](" + _py2_str(b"red") + b"e") + b"u"
    ref = b"}(" + kv(b"ref_id", b"K\x07") + kv(b"ann_id", b"J" + struct.pack("<i", 1719310)) + \
        kv(b"image_id", b"J" + struct.pack("<i", 581857)) + kv(b"split", _py2_str(b"testA")) + \
        kv(b"sentences", b"](" + sentence + b"e") + b"u"
    return b"\x80\x02](" + ref + b"e."


def test_python2_pickle_loads_as_str(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_refs_pickle("café red".encode("utf-8")))
    (ref,) = refer.load_refs(path)
    assert ref == {"ref_id": 7, "ann_id": 1719310, "image_id": 581857, "split": "testA",
                   "sentences": [{"sent": "café red", "raw": "Café RED", "sent_id": 3, "tokens": ["red"]}]}
    assert all(type(k) is str for k in ref) and type(ref["sentences"][0]["sent"]) is str


def test_python2_pickle_with_latin1_bytes(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_refs_pickle("café red".encode("latin-1")))  # not valid UTF-8
    assert refer.load_refs(path)[0]["sentences"][0]["sent"] == "café red"


def test_python3_protocol2_pickle_loads(tmp_path):
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "sentences": [{"sent": "x", "sent_id": 0, "raw": "X"}],
             "sent_ids": {0}}]
    path = tmp_path / "refs(umd).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))  # the set is reduced through builtins.set: allowed
    assert refer.load_refs(path) == refs


@pytest.mark.parametrize("content, words", [
    (pickle.dumps({"not": "a list"}, protocol=2), "expected a list of refs"),
    (pickle.dumps([{"ref_id": 5, "ann_id": 1}], protocol=2), "ref 5: missing field(s) image_id, split, sentences"),
    (pickle.dumps([{"ref_id": 5, "ann_id": 1, "image_id": 1, "split": "train", "sentences": []}], protocol=2), "non-empty list"),
    (b"\x80\x02]q\x00(K\x01", "not a readable pickle"),
])
def test_bad_refs_pickles(tmp_path, content, words):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    with pytest.raises(RefbenchError) as e:
        refer.load_refs(path)
    assert str(path) in e.value.message and words in e.value.message


def test_missing_files_name_the_path_and_a_hint(tmp_path):
    for fn, name in ((refer.load_refs, "refs(unc).p"), (refer.load_instances, "instances.json")):
        with pytest.raises(RefbenchError) as e:
            fn(tmp_path / name)
        assert str(tmp_path / name) in e.value.message and "refbench synth" in e.value.hint
    (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(RefbenchError, match="not a readable JSON"):
        refer.load_instances(tmp_path / "instances.json")


# ------------------------------------------------------------------------------------ join


def _instances() -> refer.Instances:
    return refer.Instances(
        path=Path("d/instances.json"),
        images={11: {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "height": 40, "width": 60},
                12: {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "height": 30, "width": 30}},
        anns={101: {"id": 101, "image_id": 11, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 10.0],
                    "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
              102: {"id": 102, "image_id": 12, "category_id": 44, "bbox": [1.0, 1.0, 10.0, 10.0],
                    "segmentation": [[1, 1, 11, 1, 11, 11]]}},
        categories={1: "circle", 44: "square"},
    )


def _ref(ref_id, ann_id, image_id, split="train"):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"sent": f"s{ref_id}", "raw": f"S{ref_id}.", "sent_id": ref_id * 10}]}


def test_join_groups_by_split_and_image():
    refs = [_ref(3, 102, 12, "val"), _ref(2, 101, 11), _ref(1, 101, 11)]
    splits, skipped = refer.join(refs, _instances(), "d/refs(unc).p")
    assert skipped == [] and list(splits) == ["train", "val"]
    (train,) = splits["train"]
    assert train["image_id"] == 11 and train["file_name"] == "COCO_train2014_000000000011.jpg"
    assert [r["ref_id"] for r in train["refs"]] == [1, 2]  # sorted by ref_id
    assert train["refs"][0]["bbox"] == [5.0, 5.0, 20.0, 10.0] and train["refs"][0]["sentences"][0]["raw"] == "S1."


@pytest.mark.parametrize("mutate, words", [
    (lambda inst, ref: ref.update(ann_id=999), "ann_id 999 is not in d/instances.json"),
    (lambda inst, ref: ref.update(image_id=77), "image_id 77 is not in d/instances.json"),
    (lambda inst, ref: ref.update(image_id=12), "ann_id 101 belongs to image 11, not 12"),
    (lambda inst, ref: inst.anns[101].update(segmentation=[[1, 2, 3, 4, 5]]), "polygon 0 has 5 numbers"),
    (lambda inst, ref: inst.anns[101].update(segmentation=[[1, 2, 3, 4]]), "polygon 0 has 4 numbers"),
    (lambda inst, ref: inst.anns[101].update(segmentation=[[1, 2, 3, float("nan"), 5, 6]]), "non-finite or non-numeric value nan"),
    (lambda inst, ref: inst.anns[101].update(segmentation=[[1, 2, 3, "4", 5, 6]]), "non-finite or non-numeric value '4'"),
    (lambda inst, ref: inst.anns[101].update(segmentation=[]), "not a non-empty list of polygons"),
    (lambda inst, ref: inst.anns[101].pop("bbox"), "no [x, y, w, h] bbox"),
])
def test_bad_refs_name_file_and_ref(mutate, words):
    inst, ref = _instances(), _ref(5, 101, 11)
    mutate(inst, ref)
    with pytest.raises(refer.BadInput) as e:
        refer.join([ref, _ref(6, 102, 12)], inst, "d/refs(unc).p")
    assert e.value.message.startswith("d/refs(unc).p: ref 5: ") and words in e.value.message
    assert "--skip-bad" in e.value.hint
    splits, skipped = refer.join([ref, _ref(6, 102, 12)], inst, "d/refs(unc).p", skip_bad=True)
    assert [r["ref_id"] for ims in splits.values() for im in ims for r in im["refs"]] == [6]
    assert skipped == [{"kind": "ref", "id": 5, "file": "d/refs(unc).p", "reason": e.value.reason}]


def test_bad_input_survives_pickling():
    e = refer.BadInput("image", 3, "x.jpg", "file not found")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.kind, e2.id, e2.file, e2.reason, e2.message) == ("image", 3, "x.jpg", "file not found", e.message)


# ------------------------------------------------------------------------------------ masks


def test_mask_is_the_nonzero_union_of_overlapping_polygons():
    h, w = 50, 70
    bars = [[10, 20, 60, 20, 60, 30, 10, 30], [30, 5, 40, 5, 40, 45, 30, 45]]  # a cross: the bars overlap
    summed = mask_utils.decode(mask_utils.frPyObjects(bars, h, w)).sum(axis=2)  # the refer toolkit's sum
    assert summed.max() == 2
    rle = refer.mask_rle(bars, h, w)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    m = refer.decode_mask(rle)
    assert m.dtype == np.uint8 and m.shape == (h, w) and np.array_equal(m, (summed > 0).astype(np.uint8))
    assert np.array_equal(refer.decode_mask({"size": [h, w], "counts": rle["counts"].encode()}), m)


def test_instances_round_trip(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 3}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    inst = refer.load_instances(tmp_path / "instances.json")
    assert inst.images[1]["file_name"] == "a.jpg" and inst.anns[9]["image_id"] == 1 and inst.categories == {1: "x"}
    (tmp_path / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(RefbenchError, match="not COCO instances"):
        refer.load_instances(tmp_path / "instances.json")
