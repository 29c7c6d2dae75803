"""Raw REFER reading: a safe refs-pickle loader, the instances.json join and the GT masks.

The refer toolkit layout (github.com/lichengunc/refer): `refs(<splitBy>).p` is a
pickled list of ref dicts written by Python 2; `instances.json` is COCO style. A ref carries
neither box nor mask: both come from instances.json through `ann_id`, and the image file name
from `images[].file_name` (a ref's own `file_name` has an `_<ann_id>` suffix and is not a file).

- `load_pickle` never executes anything: `SafeUnpickler.find_class` refuses every global except
  `set`/`frozenset`, so a pickle that asks for `os.system` or `builtins.eval` raises a
  `RefbenchError` naming the file and the global. Python 2 `str` values (keys and values) are
  decoded by the unpickler as UTF-8, or as latin-1 when a pickle holds one that is not valid UTF-8,
  so Python 2 and Python 3 pickles both load into plain `str`.
- `join` validates every ref against instances.json and groups refs by (split, image); a bad ref
  raises `BadInput` (one line naming the file and ref_id) or, with `skip_bad`, is listed instead.
- `mask_rle` rasterises an annotation with pycocotools (frPyObjects -> merge, i.e. the union of
  the polygons; the refer toolkit sums them, so overlaps read 2 there and nonzero is foreground)
  and returns compressed COCO RLE with `counts` as `str`.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refbench.errors import RefbenchError

DATA_HINT = "`refbench synth --out data` writes a synthetic set; real RefCOCO/+/G-Ref: the refer toolkit's refs pickles + COCO train2014 (github.com/lichengunc/refer)"
SKIP_HINT = "--skip-bad skips bad refs and images, counts them and lists them in the manifest"
_ALLOWED_GLOBALS = {  # the only globals a refs pickle may name: plain containers
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
}
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")  # fields every ref must have


class BadInput(RefbenchError):
    """A bad ref or image: one line naming the file and the id; skippable with --skip-bad."""

    def __init__(self, kind: str, id: int, file: str | Path, reason: str):
        super().__init__(f"{file}: {kind} {id}: {reason}", hint=SKIP_HINT)
        self.kind, self.id, self.file, self.reason = kind, id, str(file), reason

    def __reduce__(self):  # so that it crosses process boundaries (prepare's workers) intact
        return (BadInput, (self.kind, self.id, self.file, self.reason))

    def record(self) -> dict:
        """The manifest's `skipped` entry for this problem."""
        return {"kind": self.kind, "id": self.id, "file": self.file, "reason": self.reason}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and scalars only and refuses every other global."""

    def __init__(self, file, path: str | Path, encoding: str = "utf-8"):
        super().__init__(file, encoding=encoding)  # decodes Python 2 str
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return {"set": set, "frozenset": frozenset}[name]
        raise RefbenchError(
            f"{self.path}: refused to load: the pickle asks for {module}.{name} "
            "(a refs pickle holds only plain containers and scalars; loading it could run code)"
        )

    def persistent_load(self, pid):
        raise RefbenchError(f"{self.path}: refused to load: the pickle uses persistent ids")


def load_pickle(path: str | Path) -> Any:
    """Load a pickle of plain containers/scalars without executing anything; str keys and values."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RefbenchError(f"{path} not found", hint=DATA_HINT) from None
    except OSError as e:
        raise RefbenchError(f"{path}: cannot read ({e.strerror})") from None
    try:
        try:
            return SafeUnpickler(io.BytesIO(data), path, "utf-8").load()
        except UnicodeDecodeError:  # a Python 2 str that is not UTF-8
            return SafeUnpickler(io.BytesIO(data), path, "latin-1").load()
    except RefbenchError:
        raise
    except Exception as e:  # truncated / corrupt pickles raise many types
        raise RefbenchError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def load_refs(path: str | Path) -> list[dict]:
    """The refs pickle as a list of ref dicts, each checked for the fields the harness reads."""
    return check_refs(load_pickle(path), path)


def check_refs(refs: Any, path: str | Path) -> list[dict]:
    """`refs` (read from `path`) as a list of ref dicts, each checked for the fields the harness
    reads; one RefbenchError line naming the file and the ref otherwise."""
    if not isinstance(refs, list):
        raise RefbenchError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise RefbenchError(f"{path}: entry {i} is a {type(ref).__name__}, not a ref dict")
        where = f"{path}: ref {ref.get('ref_id', f'at index {i}')}"
        missing = [k for k in _REF_KEYS if k not in ref]
        if missing:
            raise RefbenchError(f"{where}: missing field(s) {', '.join(missing)}")
        sents = ref["sentences"]
        if not isinstance(sents, list) or not sents:
            raise RefbenchError(f"{where}: 'sentences' must be a non-empty list")
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("sent"), str) or "sent_id" not in s:
                raise RefbenchError(f"{where}: every sentence needs a str 'sent' and a 'sent_id'")
    return refs


@dataclass
class Instances:
    """instances.json indexed by id."""

    path: Path  # the file it came from
    images: dict[int, dict]  # image id -> COCO image entry (file_name, height, width, ...)
    anns: dict[int, dict]  # annotation id -> COCO annotation (image_id, category_id, bbox, segmentation, ...)
    categories: dict[int, str]  # category id -> name


def load_instances(path: str | Path) -> Instances:
    """Read and index a COCO-style instances.json."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            coco = json.load(f)
    except FileNotFoundError:
        raise RefbenchError(f"{path} not found", hint=DATA_HINT) from None
    except (OSError, ValueError) as e:
        raise RefbenchError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(coco, dict) or any(k not in coco for k in ("images", "annotations", "categories")):
        raise RefbenchError(f"{path}: not COCO instances (needs 'images', 'annotations' and 'categories')")
    try:
        return Instances(
            path=path,
            images={int(im["id"]): im for im in coco["images"]},
            anns={int(a["id"]): a for a in coco["annotations"]},
            categories={int(c["id"]): str(c["name"]) for c in coco["categories"]},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RefbenchError(f"{path}: malformed COCO entry ({type(e).__name__}: {e})") from None


def check_segmentation(seg: Any, height: int | None = None, width: int | None = None) -> str | None:
    """Why a COCO segmentation cannot be rasterised, or None when it is fine.

    Polygons: a non-empty list of flat [x1, y1, x2, y2, ...] lists of finite numbers, each of even
    length and at least 3 points. A dict is taken as COCO RLE (iscrowd): it needs size and counts,
    and its size must be the image's [height, width] when those are given (its runs are checked
    when it is rasterised, `mask_rle`).
    """
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            return "RLE segmentation without size/counts"
        size = seg["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return f"RLE size {size!r} is not [height, width]"
        if height is not None and list(size) != [height, width]:
            return f"RLE size {list(size)} is not the image's [height, width] = [{height}, {width}]"
        if not isinstance(seg["counts"], (str, bytes, list)):
            return f"RLE counts is a {type(seg['counts']).__name__}, not a string or a list of run lengths"
        return None
    if not isinstance(seg, list) or not seg:
        return "segmentation is not a non-empty list of polygons"
    for k, poly in enumerate(seg):
        if not isinstance(poly, list):
            return f"polygon {k} is not a list of numbers"
        if len(poly) < 6 or len(poly) % 2:
            return f"polygon {k} has {len(poly)} numbers (needs an even count >= 6)"
        try:
            total = math.fsum(poly)  # C speed; raises on non-numbers and inf - inf
        except (TypeError, ValueError, OverflowError):
            total = math.nan
        if not math.isfinite(total):
            bad = next((v for v in poly if not isinstance(v, (int, float)) or not math.isfinite(v)), total)
            return f"polygon {k} holds a non-finite or non-numeric value {bad!r}"
    return None


def mask_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """The union of an annotation's polygons as compressed COCO RLE {size: [h, w], counts: str}.

    A segmentation that is already RLE (a dict; `counts` a run-length list or a compressed
    string) is decoded and checked: its runs must cover the image exactly and hold only 0/1
    (pycocotools checks neither), then re-encoded. Raises ValueError saying what is wrong.
    """
    import numpy as np
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        if list(segmentation.get("size", ())) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} is not the image's [{height}, {width}]")
        counts = segmentation["counts"]
        try:
            if isinstance(counts, list):
                if any(not isinstance(c, int) or c < 0 for c in counts):
                    raise ValueError("run lengths must be non-negative integers")
                if sum(counts) != height * width:
                    raise ValueError(f"its runs cover {sum(counts)} pixels, the image has {height * width}")
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            mask = mask_utils.decode(rle)  # uint8 [H, W]
            if mask.max(initial=0) > 1 or np.count_nonzero(mask) != int(mask_utils.area(rle)):
                raise ValueError("its runs do not cover the image")
        except (ValueError, TypeError, OverflowError, UnicodeError) as e:
            raise ValueError(f"RLE counts do not decode to a {height}x{width} mask ({e})") from None
        rle = mask_utils.encode(np.asfortranarray(mask))
    else:
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles) if isinstance(rles, list) else rles  # union (intersect=0)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def mask_area(rle: dict) -> int:
    """Foreground pixels of a compressed COCO RLE as `mask_rle` returns it."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def decode_mask(rle: dict):
    """uint8 [H, W] 0/1 mask of a COCO RLE whose counts may be str or bytes."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts})


def join(refs: list[dict], inst: Instances, refs_path: str | Path, skip_bad: bool = False,
         files: dict[int, str] | None = None, join_one=None):
    """Join refs to instances.json and group them per split and image.

    `files` (ref_id -> file) names the file each ref came from in error lines when the refs were
    read from several files (a parquet snapshot, refbench.data.sources.hf); otherwise `refs_path` is named.
    `join_one(ref, inst, where)` makes one ref's entry (default: a RefCOCO ref's, `_join_one`;
    refbench.data.sources.grefer passes gRefCOCO's) or raises `BadInput`.

    Returns (splits, skipped): `splits` maps split name -> image entries sorted by image id, each
    {image_id, file_name, height, width, refs: [{ref_id, ann_id, category_id, bbox, split,
    segmentation, sentences: [{sent_id, sent, raw}]}] sorted by ref_id}; `skipped` lists the bad
    refs (manifest `skipped` records) when `skip_bad`, else the first bad ref raises `BadInput`.
    """
    skipped: list[dict] = []
    grouped: dict[tuple[str, int], list[dict]] = {}
    seen_ref_ids: set[int] = set()
    sent_owner: dict[int, int] = {}  # sent_id -> the ref_id that has it: sent_ids are unique in a dataset
    for ref in refs:
        rid = ref["ref_id"]
        where = files.get(rid, refs_path) if files else refs_path
        try:
            if rid in seen_ref_ids:
                raise BadInput("ref", rid, where, "duplicate ref_id")
            seen_ref_ids.add(rid)
            entry = (join_one or _join_one)(ref, inst, where)
            entry["sentences"] = _unique_sentences(entry, sent_owner, where, skip_bad, skipped)
        except BadInput as e:
            if not skip_bad:
                raise
            skipped.append(e.record())
            continue
        grouped.setdefault((str(ref["split"]), int(ref["image_id"])), []).append(entry)

    splits: dict[str, list[dict]] = {}
    for (split, image_id), entries in sorted(grouped.items(), key=lambda kv: kv[0][1]):
        im = inst.images[image_id]
        splits.setdefault(split, []).append({
            "image_id": image_id, "file_name": str(im["file_name"]),
            "height": int(im["height"]), "width": int(im["width"]),
            "refs": sorted(entries, key=lambda r: r["ref_id"]),
        })
    return dict(sorted(splits.items(), key=lambda kv: split_order(kv[0]))), skipped


def _unique_sentences(entry: dict, owner: dict[int, int], refs_path, skip_bad: bool, skipped: list[dict]) -> list[dict]:
    """The ref's sentences whose sent_id no earlier sentence of the dataset has; a repeated one
    raises `BadInput` (or, with `skip_bad`, is dropped and listed; a ref left without sentences
    raises)."""
    rid, kept = entry["ref_id"], []
    for s in entry["sentences"]:
        sid = s["sent_id"]
        if sid in owner:
            where = "earlier in the same ref" if owner[sid] == rid else f"by ref {owner[sid]}"
            problem = BadInput("sentence", sid, refs_path, f"ref {rid}: sent_id {sid} is already used {where} "
                                                           "(sent_ids must be unique within a dataset)")
            if not skip_bad:
                raise problem
            skipped.append(problem.record())
            continue
        owner[sid] = rid
        kept.append(s)
    if not kept:
        raise BadInput("ref", rid, refs_path, "no sentence left (every sent_id repeats an earlier one)")
    return kept


def _join_one(ref: dict, inst: Instances, refs_path: str | Path) -> dict:
    rid, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
    where = refs_path
    im = inst.images.get(image_id)
    if im is None:
        raise BadInput("ref", rid, where, f"image_id {image_id} is not in {inst.path}")
    if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")) or "file_name" not in im:
        raise BadInput("ref", rid, where, f"image {image_id} in {inst.path} lacks file_name or a positive height/width")
    ann = inst.anns.get(ann_id)
    if ann is None:
        raise BadInput("ref", rid, where, f"ann_id {ann_id} is not in {inst.path}")
    if ann.get("image_id") != image_id:
        raise BadInput("ref", rid, where, f"ann_id {ann_id} belongs to image {ann.get('image_id')}, not {image_id}")
    problem = check_segmentation(ann.get("segmentation"), im["height"], im["width"])
    if problem:
        raise BadInput("ref", rid, where, f"ann_id {ann_id} has a malformed segmentation: {problem}")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise BadInput("ref", rid, where, f"ann_id {ann_id} has no [x, y, w, h] bbox")
    try:
        return {
            "ref_id": int(rid), "ann_id": int(ann_id),
            "category_id": int(ref.get("category_id", ann.get("category_id"))),
            "bbox": [float(v) for v in ann["bbox"]], "split": str(ref["split"]),
            "segmentation": ann["segmentation"],
            "sentences": [{"sent_id": int(s["sent_id"]), "sent": s["sent"], "raw": str(s.get("raw", s["sent"]))}
                          for s in ref["sentences"]],
        }
    except (TypeError, ValueError) as e:  # an id that is not an integer
        raise BadInput("ref", rid, where, f"an id is not an integer ({e})") from None


_SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")


def split_order(split: str) -> tuple[int, str]:
    """Sort key putting splits in the usual order: train, val, test, testA, testB, then others."""
    return (_SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER), split)
