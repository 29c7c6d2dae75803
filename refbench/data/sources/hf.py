"""The refer annotations from their Hugging Face parquet mirrors: read a local snapshot, or write one.

The refer toolkit's zips are gone from their original host; the most used public copies are the
parquet datasets `jxu124/refcoco`, `jxu124/refcocoplus` and `jxu124/refcocog` (G-Ref, umd
partition). `huggingface-cli download jxu124/refcoco --repo-type dataset --local-dir DIR` leaves

    DIR/README.md                                   the dataset card (features, splits, row counts)
    DIR/data/<split>-00000-of-00001-<hash>.parquet  one file (or several shards) per split

`load_snapshot` turns such a folder into exactly what refbench.data.sources.refer gives for the refer files:
the list of ref dicts of a refs pickle and an `Instances` (the COCO image and annotation records
they point at), so both sources go through the same `refer.join` and the same checks, and give
the same shards. `write_snapshot` is the inverse (the layout above, from refer-format refs and
COCO records): `refbench synth --parquet` uses it to write its dataset in both layouts.

What was READ from the dataset cards (the `dataset_info` YAML of each card's README.md):
- one row per ref, with the columns `ref_id`, `ann_id`, `image_id`, `category_id` (int64),
  `split` (string), `file_name` (string, the ref's suffixed name as in the pickles), `sent_ids`
  (list of int64), `sentences` (a list of {raw, sent, sent_id, tokens} structs), `bbox` (list of
  float64), `raw_anns`, `raw_image_info`, `raw_sentences`, `image_path`, `global_image_id`,
  `anns_id` (strings) and `captions` (list of strings);
- splits `train`, `validation`, `test` and, for RefCOCO and RefCOCO+, `testB`; row counts
  RefCOCO 42,404 / 3,811 / 1,975 / 1,810, G-Ref 42,226 / 2,573 / 5,023 (train / validation /
  test [/ testB]): the refer unc and umd refs counts. A snapshot's own card is read for its
  row counts (`card_rows`), and a split whose files hold another number of rows is refused (the
  mirrors' history has had two `test` files side by side; a mixed download would double a split).
What was INFERRED (the cards say no more than the column types; checked where it can be):
- `test` is testA for RefCOCO/RefCOCO+ (its 1,975 rows are testA's count, and there is no
  `testA` split) and G-Ref umd's `test` for refcocog; `validation` is `val`. The `split` column
  of a row may hold either name (`test` or `testA`); any other value is refused.
- `raw_anns` is the JSON of the ref's COCO annotation record (id, image_id, category_id,
  segmentation polygons, bbox [x, y, w, h], area, iscrowd) and `raw_image_info` the JSON of its
  COCO image record (id, file_name, height, width, ...), as third-party readers of the mirrors
  use them. They are decoded with `json.loads` only (never eval'd), and checked: `raw_anns` must
  be an object whose `id` (when given) is the row's `ann_id`; `raw_image_info` an object whose
  `id` (when given) is the row's `image_id`, with `file_name`, `height` and `width` (the image
  folder is searched for that `file_name`; `image_path`, e.g. "coco/train2014/COCO_...jpg", is
  not relied on). Two rows giving different records for one annotation or image are refused.
- the `bbox` column looks like [x1, y1, x2, y2] (not relied on: the box comes from `raw_anns`,
  as it comes from instances.json in the refer route); `raw_sentences`, `captions`,
  `global_image_id`, `anns_id` and `image_path` are not read.
- the mirrors carry category ids only: category names are COCO 2014's (`COCO_CATEGORIES`).
Not verifiable offline: the exact `split` values and the full content of `raw_anns` in the
published files; a snapshot that breaks an inference above fails with one line naming the file,
the column and the row's ref_id, never a silently different dataset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refbench.data.sources.refer import BadInput, Instances
from refbench.errors import RefbenchError


@dataclass(frozen=True)
class Mirror:
    """One parquet mirror of a refer dataset on the Hugging Face Hub."""

    repo: str  # the Hub dataset id
    split_by: str  # the refer partition it holds
    splits: dict[str, str]  # mirror split name -> refbench split name


_UNC = {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}
MIRRORS = {  # refbench dataset name -> its mirror
    "refcoco": Mirror("jxu124/refcoco", "unc", _UNC),
    "refcoco+": Mirror("jxu124/refcocoplus", "unc", _UNC),
    "refcocog": Mirror("jxu124/refcocog", "umd", {"train": "train", "validation": "val", "test": "test"}),
}

SNAPSHOT_HINT = ("huggingface-cli download jxu124/refcoco --repo-type dataset --local-dir data/refcoco "
                 "(jxu124/refcocoplus -> data/refcoco+, jxu124/refcocog -> data/refcocog)")

# COCO 2014 instance categories (id -> name): the names instances.json gives; the mirrors carry ids only
_COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)]
_COCO_NAMES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,"
    "tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,"
    "tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,"
    "hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,"
    "keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,"
    "hair drier,toothbrush"
).split(",")
COCO_CATEGORIES = dict(zip(_COCO_IDS, _COCO_NAMES))
assert len(_COCO_IDS) == len(_COCO_NAMES) == 80

# the columns read, with the type the cards give them: (polars type check, what the card says)
_INT, _STR = "int", "str"
REQUIRED_COLUMNS = {
    "ref_id": _INT, "ann_id": _INT, "image_id": _INT, "category_id": _INT, "split": _STR,
    "sentences": "sentences", "raw_anns": _STR, "raw_image_info": _STR,
}
OPTIONAL_COLUMNS = {"sent_ids": "int_list", "file_name": _STR}  # read when present, checked against the rest
_SENTENCE_FIELDS = ("raw", "sent", "sent_id")  # struct fields of `sentences` that are read (`tokens` is optional)
_FILE_NAME = re.compile(r"^(?P<split>[A-Za-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?\.parquet$")


def is_snapshot(folder: str | Path) -> bool:
    """Whether `folder` looks like a local snapshot of a parquet mirror (it has data/*.parquet)."""
    return any((Path(folder) / "data").glob("*.parquet"))


def snapshot_files(folder: str | Path, dataset: str) -> dict[str, list[Path]]:
    """The parquet files of a snapshot per mirror split, checked: known splits, every shard once."""
    folder = Path(folder)
    mirror = MIRRORS[dataset]
    found: dict[str, dict[int, Path]] = {}
    counts: dict[str, int] = {}
    for path in sorted((folder / "data").glob("*.parquet")):
        m = _FILE_NAME.match(path.name)
        if m is None:
            raise RefbenchError(f"{path}: not a split file of a parquet mirror (expected <split>-00000-of-00001[-<hash>].parquet)",
                                hint=SNAPSHOT_HINT)
        split, index, count = m["split"], int(m["index"]), int(m["count"])
        if split not in mirror.splits:
            raise RefbenchError(f"{path}: split {split!r} is not one of {mirror.repo}'s splits ({', '.join(mirror.splits)})")
        if counts.setdefault(split, count) != count or index >= count:
            raise RefbenchError(f"{path}: shard {index} of {count} does not fit the other {split!r} files ({counts[split]} shards)")
        if index in found.setdefault(split, {}):
            raise RefbenchError(f"{path} and {found[split][index]} both hold shard {index} of split {split!r}: "
                                "a stale file from another revision?", hint="download the snapshot again into an empty folder")
        found[split][index] = path
    if not found:
        raise RefbenchError(f"no parquet files under {folder / 'data'}", hint=SNAPSHOT_HINT)
    for split, shards in found.items():
        missing = [i for i in range(counts[split]) if i not in shards]
        if missing:
            raise RefbenchError(f"{folder / 'data'}: split {split!r} lacks shard(s) {missing} of {counts[split]}", hint=SNAPSHOT_HINT)
    return {s: [found[s][i] for i in sorted(found[s])] for s in mirror.splits if s in found}


_CARD_SPLIT = re.compile(r"-\s*name:\s*([A-Za-z]+)\s*\n(?:\s*num_bytes:\s*[\d.]+\s*\n)?\s*num_examples:\s*(\d+)")


def card_rows(folder: str | Path) -> dict[str, int]:
    """Rows per split as the snapshot's dataset card (README.md, `dataset_info.splits`) lists them; {} without a card."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return {m[1]: int(m[2]) for m in _CARD_SPLIT.finditer(text)}


def check_schema(path: Path) -> list[str]:
    """Check a parquet file's columns against the cards; returns the column names to read."""
    import polars as pl

    try:
        schema = pl.read_parquet_schema(path)
    except Exception as e:  # polars raises several types for a non-parquet file
        raise RefbenchError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for name, kind in REQUIRED_COLUMNS.items():
        if name not in schema:
            raise RefbenchError(f"{path}: no column {name!r} (the jxu124 mirrors' cards list it; columns here: {', '.join(schema)})")
    for name, kind in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if name in schema and not _type_ok(schema[name], kind):
            raise RefbenchError(f"{path}: column {name!r} is {schema[name]}, the cards give it as {_KIND_TEXT[kind]}")
    return [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in schema]


_KIND_TEXT = {_INT: "int64", _STR: "string", "int_list": "a list of int64",
              "sentences": "a list of {raw, sent, sent_id, tokens} structs"}


def _type_ok(dtype, kind: str) -> bool:
    import polars as pl

    if kind == _INT:
        return dtype.is_integer()
    if kind == _STR:
        return dtype == pl.String
    if kind == "int_list":
        return isinstance(dtype, pl.List) and dtype.inner.is_integer()
    if kind == "sentences":
        if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
            return False
        fields = {f.name: f.dtype for f in dtype.inner.fields}
        return (all(k in fields for k in _SENTENCE_FIELDS) and fields["raw"] == pl.String
                and fields["sent"] == pl.String and fields["sent_id"].is_integer())
    raise ValueError(kind)


def _json_object(text: Any, column: str) -> dict:
    """The JSON object in a string column, or a reason why not (raised as ValueError)."""
    if text is None:
        raise ValueError(f"{column} is null")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{column} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{column} is JSON {type(value).__name__}, not an object")
    return value


@dataclass
class Snapshot:
    """A parquet snapshot read into refer's structures."""

    refs: list[dict]  # ref dicts as in a refs pickle; `split` already in refbench's names
    instances: Instances  # the COCO image/annotation records of those refs (from raw_image_info / raw_anns)
    files: dict[int, str]  # ref_id -> the parquet file its row came from (for error lines)
    skipped: list[dict]  # bad rows skipped under --skip-bad (manifest `skipped` records)
    sources: dict = field(default_factory=dict)  # the manifest's `sources` entry


def load_snapshot(folder: str | Path, dataset: str, images: str | Path | None = None, skip_bad: bool = False,
                  categories: dict[int, str] | None = None) -> Snapshot:
    """Read a local snapshot of `dataset`'s parquet mirror into refer's structures.

    Every file's schema is checked first (a missing or mistyped column is one line naming the file
    and the column). Per row: `split` must name the file's split, `raw_anns`/`raw_image_info` must
    be JSON objects that agree with the row's ids and with the other rows, `sent_ids` unique in the
    dataset, and (when `images` is given) the image file present; a bad row raises `BadInput`
    naming the file and its ref_id, or with `skip_bad` is skipped and listed. `categories` (id ->
    name) defaults to COCO's.
    """
    import polars as pl

    folder = Path(folder)
    mirror = MIRRORS[dataset]
    per_split = snapshot_files(folder, dataset)
    refs: list[dict] = []
    images_by_id: dict[int, dict] = {}
    anns_by_id: dict[int, dict] = {}
    files: dict[int, str] = {}
    sent_owner: dict[int, int] = {}
    skipped: list[dict] = []
    file_records: list[dict] = []
    split_values: dict[str, set] = {}

    card = card_rows(folder)
    absent = [s for s in card if s in mirror.splits and s not in per_split]
    if absent:
        raise RefbenchError(f"{folder / 'data'}: no parquet file of split(s) {', '.join(absent)}, which its card "
                            f"({folder / 'README.md'}) lists", hint="a partial download? download the snapshot again into an empty folder")
    for mirror_split, paths in per_split.items():
        ours = mirror.splits[mirror_split]
        loaded = []
        for path in paths:
            columns = check_schema(path)
            try:
                loaded.append((path, pl.read_parquet(path, columns=columns).to_dicts()))
            except Exception as e:
                raise RefbenchError(f"{path}: cannot read its rows ({type(e).__name__}: {e})") from None
            file_records.append({"path": str(path), "sha256": _sha256(path), "split": mirror_split,
                                 "maps_to": ours, "rows": len(loaded[-1][1])})
        n_rows = sum(len(rows) for _, rows in loaded)
        if mirror_split in card and card[mirror_split] != n_rows:
            raise RefbenchError(f"{folder / 'data'}: split {mirror_split!r} has {n_rows} rows, its card ({folder / 'README.md'}) "
                                f"lists {card[mirror_split]}", hint="a partial or mixed download? download the snapshot again into an empty folder")
        for path, rows in loaded:
            for i, row in enumerate(rows):
                rid = row["ref_id"]
                if rid is None:
                    raise RefbenchError(f"{path}: row {i} has a null ref_id")
                try:
                    ref, image, ann = _row(row, mirror_split, ours, path)
                    if rid in files:
                        raise BadInput("ref", rid, path, f"duplicate ref_id (also in {files[rid]})")
                    for s in ref["sentences"]:
                        if s["sent_id"] in sent_owner:
                            raise BadInput("ref", rid, path, f"sent_id {s['sent_id']} is also a sentence of ref {sent_owner[s['sent_id']]}")
                    _merge(images_by_id, image, "raw_image_info", "image", rid, path)
                    _merge(anns_by_id, ann, "raw_anns", "annotation", rid, path)
                except BadInput as e:
                    if not skip_bad:
                        raise
                    skipped.append(e.record())
                    continue
                split_values.setdefault(mirror_split, set()).add(row["split"])
                for s in ref["sentences"]:
                    sent_owner[s["sent_id"]] = rid
                files[rid] = str(path)
                refs.append(ref)

    names = COCO_CATEGORIES if categories is None else categories
    inst = Instances(path=folder, images=images_by_id, anns=anns_by_id, categories=dict(names))
    if images is not None:
        refs = _check_images(refs, inst, Path(images), files, skip_bad, skipped)
    sources = {
        "source": "hf", "repo": mirror.repo, "split_by": mirror.split_by, "snapshot": str(folder),
        "split_map": {s: mirror.splits[s] for s in per_split},
        "split_column": {s: sorted(v) for s, v in split_values.items()},
        "files": file_records,
        "card_rows": card,
        "category_names": "COCO 2014 (the mirrors carry category ids only)" if categories is None else "given by the caller",
        "images": None if images is None else str(images),
    }
    return Snapshot(refs=refs, instances=inst, files=files, skipped=skipped, sources=sources)


def _row(row: dict, mirror_split: str, ours: str, path: Path) -> tuple[dict, dict, dict]:
    """(ref dict, COCO image record, COCO annotation record) of one row; BadInput when it is bad."""
    rid = row["ref_id"]
    for col in ("ann_id", "image_id", "category_id", "split", "sentences"):
        if row[col] is None:
            raise BadInput("ref", rid, path, f"{col} is null")
    if row["split"] not in (mirror_split, ours):
        raise BadInput("ref", rid, path, f"column 'split' is {row['split']!r} in a {mirror_split!r} file "
                                         f"(expected {mirror_split!r} or {ours!r})")
    try:
        ann = _json_object(row["raw_anns"], "raw_anns")
        image = _json_object(row["raw_image_info"], "raw_image_info")
    except ValueError as e:
        raise BadInput("ref", rid, path, str(e)) from None
    for column, record, keys in (("raw_anns", ann, ("segmentation", "bbox")), ("raw_image_info", image, ("file_name", "height", "width"))):
        missing = [k for k in keys if k not in record]
        if missing:
            raise BadInput("ref", rid, path, f"{column} has no {', '.join(map(repr, missing))} (a COCO "
                                             f"{'annotation' if column == 'raw_anns' else 'image'} record is expected)")
    if ann.setdefault("id", row["ann_id"]) != row["ann_id"]:
        raise BadInput("ref", rid, path, f"raw_anns is annotation {ann['id']}, but ann_id is {row['ann_id']}")
    if image.setdefault("id", row["image_id"]) != row["image_id"]:
        raise BadInput("ref", rid, path, f"raw_image_info is image {image['id']}, but image_id is {row['image_id']}")
    sentences = []
    for s in row["sentences"]:
        if s is None or s.get("sent_id") is None or not isinstance(s.get("sent"), str):
            raise BadInput("ref", rid, path, "a sentence without sent_id or sent")
        sentences.append({"tokens": list(s.get("tokens") or []), "raw": s["raw"] if s.get("raw") is not None else s["sent"],
                          "sent_id": int(s["sent_id"]), "sent": s["sent"]})
    if not sentences:
        raise BadInput("ref", rid, path, "'sentences' is empty")
    ids = [s["sent_id"] for s in sentences]
    if len(set(ids)) != len(ids):
        raise BadInput("ref", rid, path, f"duplicate sent_ids {sorted({i for i in ids if ids.count(i) > 1})} in one ref")
    if row.get("sent_ids") is not None and list(row["sent_ids"]) != ids:
        raise BadInput("ref", rid, path, f"sent_ids {list(row['sent_ids'])} differ from the sentences' sent_id {ids}")
    ref = {"sent_ids": ids, "file_name": row.get("file_name"), "ann_id": int(row["ann_id"]), "ref_id": int(rid),
           "image_id": int(row["image_id"]), "split": ours, "sentences": sentences, "category_id": int(row["category_id"])}
    return ref, image, ann


def _merge(records: dict[int, dict], record: dict, column: str, what: str, rid: int, path: Path) -> None:
    """Add a COCO record shared by several rows; rows must agree on it."""
    key = record["id"]
    if key in records and records[key] != record:
        raise BadInput("ref", rid, path, f"{column} gives {what} {key} other fields than an earlier row does")
    records.setdefault(key, record)


def _check_images(refs, inst: Instances, images: Path, files, skip_bad: bool, skipped: list) -> list[dict]:
    """Drop (skip_bad) or refuse refs whose image file is not in the images folder."""
    present: dict[str, bool] = {}
    kept = []
    for ref in refs:
        name = inst.images.get(ref["image_id"], {}).get("file_name")
        if isinstance(name, str):
            if name not in present:
                present[name] = (images / name).is_file()
            if not present[name]:
                e = BadInput("ref", ref["ref_id"], files[ref["ref_id"]],
                             f"image {name} (image_id {ref['image_id']}) is not in {images}")
                if not skip_bad:
                    raise e
                skipped.append(e.record())
                continue
        kept.append(ref)
    return kept


def _sha256(path: Path) -> str:
    from refbench.fsutil import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------------------------- writing the layout


def write_snapshot(folder: str | Path, dataset: str, refs: list[dict], images: dict[int, dict], anns: dict[int, dict]) -> list[Path]:
    """Write refer-format refs (and the COCO records they use) as a parquet mirror snapshot of `dataset`.

    The layout and columns of the jxu124 mirrors: `folder/README.md` (a card with `dataset_info`)
    and `folder/data/<split>-00000-of-00001.parquet` per split, mirror split names (`val` ->
    `validation`, `testA` -> `test`). The columns refbench does not read are filled the way the
    mirrors appear to fill them (`bbox` as [x1, y1, x2, y2], `image_path` "coco/train2014/<file>",
    `captions` the sentences). Returns the parquet files written (atomically).
    """
    import io

    import polars as pl

    from refbench.fsutil import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    mirror = MIRRORS[dataset]
    back = {ours: theirs for theirs, ours in mirror.splits.items()}
    rows: dict[str, list[dict]] = {}
    for r in refs:
        if r["split"] not in back:
            raise RefbenchError(f"{dataset}: split {r['split']!r} has no counterpart in {mirror.repo}")
        ann, im = anns[r["ann_id"]], images[r["image_id"]]
        x, y, w, h = ann["bbox"]
        sentences = [{"raw": s.get("raw", s["sent"]), "sent": s["sent"], "sent_id": int(s["sent_id"]),
                      "tokens": list(s.get("tokens") or s["sent"].split())} for s in r["sentences"]]
        rows.setdefault(back[r["split"]], []).append({
            "sent_ids": [s["sent_id"] for s in sentences], "file_name": r.get("file_name") or im["file_name"],
            "ann_id": int(r["ann_id"]), "ref_id": int(r["ref_id"]), "image_id": int(r["image_id"]), "split": r["split"],
            "sentences": sentences, "category_id": int(r["category_id"]),
            "raw_anns": json.dumps(ann), "raw_image_info": json.dumps(im), "raw_sentences": json.dumps(sentences),
            "image_path": f"coco/train2014/{im['file_name']}", "bbox": [float(x), float(y), float(x + w), float(y + h)],
            "captions": [s["sent"] for s in sentences], "global_image_id": f"coco.{r['image_id']}",
            "anns_id": str(r["ann_id"]),
        })
    schema = {
        "sent_ids": pl.List(pl.Int64), "file_name": pl.String, "ann_id": pl.Int64, "ref_id": pl.Int64,
        "image_id": pl.Int64, "split": pl.String,
        "sentences": pl.List(pl.Struct({"raw": pl.String, "sent": pl.String, "sent_id": pl.Int64, "tokens": pl.List(pl.String)})),
        "category_id": pl.Int64, "raw_anns": pl.String, "raw_image_info": pl.String, "raw_sentences": pl.String,
        "image_path": pl.String, "bbox": pl.List(pl.Float64), "captions": pl.List(pl.String),
        "global_image_id": pl.String, "anns_id": pl.String,
    }
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for stale in data.glob("*.parquet"):
        stale.unlink()
    written = []
    for split in [s for s in mirror.splits if s in rows]:
        buf = io.BytesIO()
        pl.DataFrame(rows[split], schema=schema).write_parquet(buf, statistics=False)
        path = data / f"{split}-00000-of-00001.parquet"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    atomic_write_text(folder / "README.md", _card(mirror, dataset, {s: len(rows[s]) for s in mirror.splits if s in rows}))
    return written


def _card(mirror: Mirror, dataset: str, counts: dict[str, int]) -> str:
    """A dataset card in the mirrors' form (the `dataset_info` YAML), naming what wrote it."""
    features = "\n".join(f"  - name: {c}" for c in (
        "sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences", "category_id", "raw_anns",
        "raw_image_info", "raw_sentences", "image_path", "bbox", "captions", "global_image_id", "anns_id"))
    splits = "\n".join(f"  - name: {s}\n    num_examples: {n}" for s, n in counts.items())
    return (f"---\ndataset_info:\n  features:\n{features}\n  splits:\n{splits}\n---\n"
            f"# {dataset} in the layout of {mirror.repo}\n\nWritten by refbench (synthetic or converted data), "
            f"not downloaded from the Hub.\n")


def convert_refer(data: str | Path, dataset: str, out: str | Path | None = None) -> list[Path]:
    """Write the refer files of `dataset` under `data` (refs pickle of the mirror's partition +
    instances.json) as a parquet snapshot in `out` (default: the dataset folder itself)."""
    from refbench.data.sources import refer

    data = Path(data)
    mirror = MIRRORS[dataset]
    refs = refer.load_refs(data / dataset / f"refs({mirror.split_by}).p")
    inst = refer.load_instances(data / dataset / "instances.json")
    return write_snapshot(Path(out) if out is not None else data / dataset, dataset, refs, inst.images, inst.anns)
