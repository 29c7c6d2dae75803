"""gRefCOCO (generalized RIS) raw reading: `grefs(unc).json` / `.p` + instances.json -> prepare's splits.

The layout ReLA reads (github.com/henghuiding/ReLA, `datasets/DATASET.md`):

    ROOT/grefcoco/grefs(unc).json     a JSON list of refs (or grefs(unc).p, a pickle: read first, as ReLA does)
    ROOT/grefcoco/instances.json      COCO style
    ROOT/images/train2014/...         the COCO JPEGs, as for RefCOCO

A gRefCOCO ref differs from a RefCOCO one in what it points at, read as ReLA's loader reads it:

- `ann_id` is an int or a list of ints; `[-1]` (or `-1`) marks a no-target ref. `ann_id` is
  trusted: a `no_target` key that disagrees with it is counted in the manifest
  (`gres.no_target_key_disagreements`), never believed.
- `category_id` is an int or a list; it is not read (each target's category comes from its
  annotation), so a no-target ref may carry -1, [] or anything there.
- The sentence's mask is the union of the ref's non-crowd annotations (a crowd annotation named
  by a ref is left out of the mask, as ReLA's loader does, but kept in `targets` with
  `iscrowd` 1); a no-target sentence's mask is empty.
- Splits train, val, testA, testB (`SPLITS`); the public release has had train and val only:
  what exists is prepared and the absent ones are named (manifest `gres.absent_splits`).

Bad input, each one `BadInput` line naming the file and the ref (or, with `--skip-bad`, skipped,
counted and listed in the manifest): an `ann_id` that names no annotation, `-1` mixed with real
ids, an annotation of another image, a targeted ref whose annotations are all crowd, a duplicate
ref_id or sent_id, a malformed segmentation.

`read` returns the same (splits, skipped, categories, sources) as prepare's RefCOCO readers, each
ref entry carrying `targets`; `target_rle` and `shard_fields` are what prepare's shard workers call
for such a ref (docs/shards.md, "gRefCOCO refs").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refbench.data.sources.refer import (
    BadInput,
    Instances,
    check_refs,
    check_segmentation,
)
from refbench.data.sources.refer import join as refer_join
from refbench.data.sources.refer import load_instances, load_pickle, mask_rle
from refbench.errors import RefbenchError

DATASET = "grefcoco"
SPLITS = ("train", "val", "testA", "testB")  # ReLA's register_refcoco.py
DATA_HINT = ("`refbench synth --out data` writes a synthetic gRefCOCO under data/grefcoco; the real one: "
             "grefs(unc).json + instances.json from github.com/henghuiding/gRefCOCO")


def refs_path(data: Path, split_by: str) -> Path | None:
    """The refs file of `data/grefcoco`: grefs(<split_by>).p if present (ReLA reads it first), else .json."""
    folder = Path(data) / DATASET
    for name in (f"grefs({split_by}).p", f"grefs({split_by}).json"):
        if (folder / name).is_file():
            return folder / name
    return None


def sources(data: Path, split_by: str) -> tuple[Path, Path]:
    """(refs file, instances.json) of `data/grefcoco`, or one line saying which is missing."""
    refs, inst = refs_path(data, split_by), Path(data) / DATASET / "instances.json"
    if refs is None:
        raise RefbenchError(f"{Path(data) / DATASET}/grefs({split_by}).json not found (nor grefs({split_by}).p)",
                            hint=DATA_HINT)
    if not inst.is_file():
        raise RefbenchError(f"{inst} not found (needed for {DATASET}_{split_by})", hint=DATA_HINT)
    return refs, inst


def load_grefs(path: Path) -> list[dict]:
    """The refs of a grefs JSON (or pickle, through refbench.data.sources.refer's safe unpickler), checked for the keys read."""
    path = Path(path)
    if path.suffix == ".p":
        refs = load_pickle(path)
    else:
        try:
            refs = json.loads(path.read_bytes())
        except OSError as e:
            raise RefbenchError(f"{path}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise RefbenchError(f"{path}: not a readable JSON file ({e})") from None
    return check_refs(refs, path)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def ann_ids(ref: dict, where) -> list[int]:
    """The ref's `ann_id` as a list ([-1] for no target), or BadInput saying why it is not one."""
    rid, raw = ref["ref_id"], ref["ann_id"]
    ids = [raw] if _int(raw) else raw if isinstance(raw, list) else None
    if ids is None or not ids or not all(_int(a) for a in ids):
        raise BadInput("ref", rid, where, f"ann_id {raw!r} is neither an integer nor a non-empty list of integers")
    if -1 in ids and ids != [-1]:
        raise BadInput("ref", rid, where, f"ann_id {raw!r} mixes -1 (no target) with annotation ids")
    return list(dict.fromkeys(ids))  # a repeated id names the same annotation: the union is unchanged


def _join_one(ref: dict, inst: Instances, where) -> dict:
    rid, image_id = ref["ref_id"], ref["image_id"]
    im = inst.images.get(image_id)
    if im is None:
        raise BadInput("ref", rid, where, f"image_id {image_id} is not in {inst.path}")
    if not all(_int(im.get(k)) and im[k] > 0 for k in ("height", "width")) or "file_name" not in im:
        raise BadInput("ref", rid, where, f"image {image_id} in {inst.path} lacks file_name or a positive height/width")
    ids = ann_ids(ref, where)
    targets, segs = [], []
    if ids != [-1]:
        for a in ids:
            ann = inst.anns.get(a)
            if ann is None:
                raise BadInput("ref", rid, where, f"ann_id {a} is not in {inst.path}")
            if ann.get("image_id") != image_id:
                raise BadInput("ref", rid, where, f"ann_id {a} belongs to image {ann.get('image_id')}, not {image_id}")
            crowd = 1 if ann.get("iscrowd") else 0
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise BadInput("ref", rid, where, f"ann_id {a} has no [x, y, w, h] bbox")
            if not crowd:
                problem = check_segmentation(ann.get("segmentation"), im["height"], im["width"])
                if problem:
                    raise BadInput("ref", rid, where, f"ann_id {a} has a malformed segmentation: {problem}")
                segs.append(ann["segmentation"])
            try:
                cat = int(ann["category_id"])
            except (KeyError, TypeError, ValueError):
                raise BadInput("ref", rid, where, f"ann_id {a} has no integer category_id") from None
            targets.append({"ann_id": a, "category_id": cat, "bbox": [float(v) for v in bbox], "iscrowd": crowd,
                            **({} if crowd else {"segmentation": ann["segmentation"]})})  # polygons: the rela protocol rasterises them at 480
        if not segs:
            raise BadInput("ref", rid, where, f"every annotation it names ({', '.join(map(str, ids))}) is crowd: "
                                              "its mask would be empty though it has targets (ReLA drops crowd annotations)")
    kept = [t for t in targets if not t["iscrowd"]]
    try:
        sentences = [{"sent_id": int(s["sent_id"]), "sent": s["sent"], "raw": str(s.get("raw", s["sent"]))}
                     for s in ref["sentences"]]
        rid = int(rid)
    except (TypeError, ValueError) as e:
        raise BadInput("ref", rid, where, f"an id is not an integer ({e})") from None
    return {
        "ref_id": rid, "ann_id": ids, "no_target": ids == [-1],
        "category_id": sorted({t["category_id"] for t in kept}),
        "bbox": _union_box([t["bbox"] for t in kept]), "split": str(ref["split"]),
        "targets": targets, "segmentations": segs, "sentences": sentences,
    }


def _union_box(boxes: list[list[float]]) -> list[float] | None:
    """The [x, y, w, h] box around the given boxes (None for none: a no-target ref)."""
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def join(refs: list[dict], inst: Instances, refs_file: Path, skip_bad: bool = False):
    """Join grefs to instances.json, grouped per split and image: `refbench.data.sources.refer.join`
    with gRefCOCO's `_join_one`.

    Returns (splits, skipped, disagreements): `disagreements` lists, in file order, the ref_ids whose
    `no_target` key contradicts their `ann_id` (ann_id wins), among the refs joined.
    """
    splits, skipped = refer_join(refs, inst, refs_file, skip_bad=skip_bad, join_one=_join_one)
    joined = {r["ref_id"]: r["no_target"] for images in splits.values() for im in images for r in im["refs"]}
    disagree, seen = [], set()
    for ref in refs:
        rid = ref["ref_id"]
        if rid in seen:  # a repeated ref_id is a bad ref of its own, never joined
            continue
        seen.add(rid)
        if "no_target" in ref and rid in joined and bool(ref["no_target"]) != joined[rid]:
            disagree.append(rid)
    return splits, skipped, disagree


def read(data: Path, split_by: str, images: Path, skip_bad: bool, cache: dict):
    """(splits, skipped, categories, sources) for prepare; `sources["gres"]` goes to the manifest's `gres`."""
    from refbench.fsutil import sha256_file

    refs_file, inst_path = sources(data, split_by)
    inst_sha = sha256_file(inst_path)
    if inst_sha not in cache:
        cache[inst_sha] = load_instances(inst_path)
    inst = cache[inst_sha]
    refs = load_grefs(refs_file)
    splits, skipped, disagree = join(refs, inst, refs_file, skip_bad=skip_bad)
    srcs = {"source": "grefer", "refs": {"path": str(refs_file), "sha256": sha256_file(refs_file)},
            "instances": {"path": str(inst_path), "sha256": inst_sha}, "images": str(images),
            "gres": {"absent_splits": [s for s in SPLITS if s not in splits],
                     "no_target_key_disagreements": {"count": len(disagree), "first": disagree[:20]}}}
    return splits, skipped, inst.categories, srcs


def target_rle(ref: dict, image: dict, instances: str) -> dict:
    """A gRefCOCO ref's GT mask as COCO RLE: the union of its non-crowd annotations (empty for no target).

    BadInput naming instances.json and the ref when a segmentation does not rasterise or a
    targeted ref's union has zero area.
    """
    import numpy as np
    from pycocotools import mask as mask_utils

    h, w = image["height"], image["width"]
    if ref["no_target"]:
        rle = mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    try:
        parts = [mask_rle(seg, h, w) for seg in ref["segmentations"]]
    except Exception as e:  # pycocotools raises ValueError, TypeError, OverflowError on bad input
        raise BadInput("ref", ref["ref_id"], instances, f"ann_id {ref['ann_id']}: a segmentation does not rasterise ({e})") from None
    if len(parts) == 1:
        rle = parts[0]
    else:
        merged = mask_utils.merge([{"size": p["size"], "counts": p["counts"].encode("ascii")} for p in parts])
        rle = {"size": [h, w], "counts": merged["counts"].decode("ascii")}
    if int(mask_utils.area({"size": [h, w], "counts": rle["counts"].encode("ascii")})) == 0:
        raise BadInput("ref", ref["ref_id"], instances, f"ann_id {ref['ann_id']}: the targets' union has zero area "
                                                        f"in the {w}x{h} image (no pixel to find)")
    return rle


def shard_fields(ref: dict) -> dict:
    """What a gRefCOCO ref adds to its shard JSON beside the RefCOCO fields: the no-target flag
    and every target annotation (id, category, box, iscrowd), so a box task needs no re-prepare."""
    return {"no_target": ref["no_target"], "targets": ref["targets"]}


def n_targets(ref: dict) -> int:
    """Target count of a shard ref (0 for no target; crowd annotations, left out of the mask, not counted)."""
    if "targets" not in ref:
        return 1
    return 0 if ref.get("no_target") else sum(1 for t in ref["targets"] if not t.get("iscrowd"))
