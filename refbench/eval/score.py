"""The neutral scorer: `refbench sentences` and `refbench score`, for any model's binary masks.

    prepared shards --sentences()--> what must be predicted (JSONL, one line per sentence)
    your model      --------------> a submission (RLE JSONL, PNG-path JSONL or a PNG folder)
    submission + shards --score()--> validated -> I and U per sentence -> a result record

A submission holds one binary mask per sentence of the split, at the original image size:

- a JSONL file (optionally gzip-compressed, `.gz`), one object per line:
  `{"sent_id": 123, "rle": {"size": [H, W], "counts": "..."}}`, the COCO compressed RLE as
  pycocotools' `mask.encode` writes it (column-major runs, `counts` decoded to a str);
- a JSONL file whose lines give `{"sent_id": 123, "png": "relative/path.png"}` (paths relative
  to the JSONL file's folder);
- a folder of `<sent_id>.png` files.
A PNG mask is foreground wherever a pixel is nonzero (any channel; palette index for mode P).

Validation comes before anything is published: every sentence of the split exactly once, no
unknown sent_id, no duplicate, every mask the size of its image, every RLE or PNG decodable,
every line valid JSON. A bad submission raises one `RefbenchError` line naming what is wrong,
how many entries and the first offenders (sent_id or line number); nothing is written.

Counting. I and U come from the RLEs themselves, never from decoded masks: I is the area of
pycocotools' intersection of the two RLEs (`mask.merge(..., intersect=True)`, `mask.area`),
U = |pred| + |gt| - I. An RLE's runs are checked to cover exactly H x W pixels by a
vectorised numpy parse of its counts string (refbench.eval.rle; pycocotools does not check this and would count
garbage). So scoring costs less than decoding the masks would (`refbench bench score`).

Ground truth is the shard's mask: the union of the annotation's polygons, any nonzero pixel
(as CRIS and the refer toolkit's getMask). Protocols that compare at the original image size
(`metrics.takes_binary_masks`) apply to a submission directly; those that compare at the
network input need the model's probability map and refuse a submission with one line.

The published record is an ordinary result record (`refbench.eval.results`, schema v2) with
`source: "submitted"` and a `submission` entry (file, format, sha256, entries, note), so
breakdowns, bootstrap intervals, `refbench compare` and the leaderboard work on it unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from refbench import fsutil, remote
from refbench.errors import RefbenchError
from refbench.eval import metrics
from refbench.eval.rle import rles_ok
from refbench.eval.truth import Truth, ground_truth
from refbench.memory import collector_paused

# The fields of one line of `refbench sentences`, in order.
SENTENCE_FIELDS = ("sent_id", "ref_id", "ann_id", "image_id", "file_name", "height", "width", "category_id", "sentence")
FORMATS = ("rle-jsonl", "png-jsonl", "png-folder")  # submission layouts, as named in records
SHOW = 5  # offenders named in an error line
_PNG_NAME = re.compile(r"^(\d+)\.png$")
FORMAT_HINT = (
    'one JSON object per line: {"sent_id": 123, "rle": {"size": [H, W], "counts": "..."}} '
    '(pycocotools mask.encode, counts as a str) or {"sent_id": 123, "png": "path.png"}; '
    "or a folder of <sent_id>.png"
)


def sentence_lines(truth: Truth) -> Iterator[str]:
    """One JSON line per sentence: SENTENCE_FIELDS, in the shards' order."""
    cols = [getattr(truth, f) for f in SENTENCE_FIELDS]
    for values in zip(*cols):
        yield json.dumps(dict(zip(SENTENCE_FIELDS, values)), ensure_ascii=False) + "\n"


def _refuse_gres(dataset: str, function: str) -> None:
    """gRefCOCO has its own rules and protocols, in refbench.eval.gres_score (built on this module)."""
    from refbench.data.datasets import is_gres

    if is_gres(dataset):
        raise RefbenchError(f"{dataset} is a gRefCOCO dataset: use refbench.eval.gres_score.{function} "
                            "(`refbench score` and `refbench sentences` choose it)")


def main_sentences(dataset: str, split: str, shards: Path, out: Path | None) -> int:
    """`refbench sentences`: the JSONL list of what must be predicted; stdout without `out`."""
    import sys

    _refuse_gres(dataset, "main_sentences")

    truth = ground_truth(remote.join(shards, dataset), split=split)
    if out is None:
        sys.stdout.writelines(sentence_lines(truth))
    else:
        write_jsonl(out, sentence_lines(truth))
        print(f"{len(truth)} sentences of {dataset}/{split} written to {out}", file=sys.stderr)
    return len(truth)


def encode_mask(mask: np.ndarray) -> dict:
    """A binary mask [H, W] (nonzero = foreground) as a submission RLE {"size", "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def count_iu(pred: list[dict], gt: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """I and U (int64 [N]) of paired RLEs (pycocotools dicts, counts as bytes), without decoding.

    I = area(pred AND gt) from pycocotools' RLE intersection, U = area(pred) + area(gt) - I.
    """
    inter, union, _ = count_iu_areas(pred, gt)
    return inter, union


def count_iu_areas(pred: list[dict], gt: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count_iu` and area(pred) (int64 [N]) from the same pass (the gRefCOCO scorer's empty-mask rule)."""
    from pycocotools import mask as mask_utils

    if len(pred) != len(gt):
        raise RefbenchError(f"{len(pred)} predicted masks for {len(gt)} GT masks")
    if not pred:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    inter = [mask_utils.merge([p, g], intersect=True) for p, g in zip(pred, gt)]
    i = _areas(inter)  # [N]
    area = _areas(pred)  # [N]
    return i, area + _areas(gt) - i, area


_AREA_CHUNK = 255  # pycocotools 2.0.11's mask.area overflows on lists of more than 255 RLEs (numpy 2)


def _areas(rles: list[dict]) -> np.ndarray:
    """Foreground pixels of each RLE, int64 [N] (pycocotools mask.area, in chunks)."""
    from pycocotools import mask as mask_utils

    parts = [mask_utils.area(rles[k : k + _AREA_CHUNK]) for k in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(parts).astype(np.int64)


# --------------------------------------------------------------------------- submissions


@dataclass
class Submission:
    """A parsed submission: where it is, its layout and hash, and its entries in file order."""

    path: Path
    format: str  # one of FORMATS
    sha256: str  # of the file's bytes; for a folder, of its sorted "<name>  <sha256 of the file>" lines
    entries: list[dict]  # {"where": "line 3" | "12.png", "sent_id", "rle" | "png": Path | bytes}


class _Problems:
    """Offenders collected by kind, in the order the kinds are first met."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}
        self.totals: dict[str, int] = {}  # kinds counted out of something other than the entries

    def add(self, kind: str, offender: Any, out_of: int | None = None) -> None:
        self.kinds.setdefault(kind, []).append(str(offender))
        if out_of is not None:
            self.totals[kind] = out_of

    def raise_if_any(self, path: Path, total: int | None = None) -> None:
        """One RefbenchError: "<n> of <total> entries <kind> (first: ...)", other kinds counted in the hint."""
        if not self.kinds:
            return
        (kind, offenders), *others = self.kinds.items()
        noun = "entries" if kind not in self.totals else "sentences of the split"
        total = self.totals.get(kind, total)
        of = f" of {total}" if total is not None else ""
        first = ", ".join(offenders[:SHOW]) + (", ..." if len(offenders) > SHOW else "")
        message = f"submission {path}: {len(offenders)}{of} {noun} {kind} (first: {first}); nothing was written"
        also = "; ".join(f"{len(o)} {'entries' if k not in self.totals else 'sentences'} {k}" for k, o in others)
        hint = (f"also: {also}. " if also else "") + f"expected {FORMAT_HINT}"
        raise RefbenchError(message, hint=hint)


def _sha256_folder(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}  {fsutil.sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_submission(path: str | Path) -> Submission:
    """Parse a submission file or folder (no masks decoded yet); one-line RefbenchError if malformed.

    Checks here: the file or folder exists and reads, every line is a JSON object with an
    integer `sent_id` and exactly one of `rle` (with `size` [H, W] and a str `counts`) and
    `png` (a relative path), every folder entry is named `<sent_id>.png`.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise RefbenchError(f"submission {path} does not exist", hint=f"expected {FORMAT_HINT}") from None
    except OSError as e:
        raise RefbenchError(f"submission {path} cannot be read ({e.strerror})") from None
    digest = fsutil.sha256_bytes(payload)
    if payload[:2] == b"\x1f\x8b":
        try:
            payload = gzip.decompress(payload)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise RefbenchError(f"submission {path} is not a readable gzip file ({e})") from None
    problems = _Problems()
    entries: list[dict] = []
    kinds: set[str] = set()
    lines = payload.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            obj = orjson.loads(line)
        except (ValueError, UnicodeDecodeError):
            problems.add("are not valid JSON", where)
            continue
        entry = _entry(obj, where, problems)
        if entry is not None:
            kinds.add("rle" if "rle" in entry else "png")
            entries.append(entry)
    total = sum(1 for line in lines if line.strip())
    problems.raise_if_any(path, total)
    if not entries:
        raise RefbenchError(f"submission {path} holds no entries", hint=f"expected {FORMAT_HINT}")
    fmt = "png-jsonl" if kinds == {"png"} else "rle-jsonl" if kinds == {"rle"} else "mixed-jsonl"
    base = path.parent
    for e in entries:
        if "png" in e:
            e["png"] = base / e["png"]
    return Submission(path=path, format=fmt, sha256=digest, entries=entries)


def _entry(obj: Any, where: str, problems: _Problems) -> dict | None:
    """One line's entry, or None after recording what is wrong with it."""
    if not isinstance(obj, dict):
        problems.add("are not JSON objects", where)
        return None
    sid = obj.get("sent_id")
    if isinstance(sid, bool) or not isinstance(sid, int):
        problems.add("lack an integer sent_id", where)
        return None
    where = f"{where} (sent_id {sid})"
    if "no_target" in obj and not isinstance(obj["no_target"], bool):  # gRefCOCO's decision (refbench.eval.gres_score)
        problems.add("have a 'no_target' that is not true or false", where)
        return None
    extra = {"no_target": obj["no_target"]} if "no_target" in obj else {}
    has = [k for k in ("rle", "png") if k in obj]
    if len(has) != 1:
        problems.add("need exactly one of 'rle' and 'png'", where)
        return None
    if has == ["png"]:
        p = obj["png"]
        if not isinstance(p, str) or not p or Path(p).is_absolute():
            problems.add("give a 'png' that is not a relative path", where)
            return None
        return {"where": where, "sent_id": sid, "png": p, **extra}
    rle = obj["rle"]
    size = rle.get("size") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        problems.add("have an 'rle' without a 'size' [H, W]", where)
        return None
    if not isinstance(rle.get("counts"), str):
        problems.add("have RLE 'counts' that are not a string (compressed RLE)", where)
        return None
    return {"where": where, "sent_id": sid, "rle": rle, **extra}


def _read_folder(path: Path) -> Submission:
    files = [f for f in path.iterdir() if not f.name.startswith(".")]
    problems = _Problems()
    entries = []
    for f in sorted(files, key=lambda p: p.name):
        m = _PNG_NAME.match(f.name)
        if not m or not f.is_file():
            problems.add("are not files named <sent_id>.png", f.name)
            continue
        entries.append({"where": f.name, "sent_id": int(m.group(1)), "png": f})
    problems.raise_if_any(path, len(files))
    if not entries:
        raise RefbenchError(f"submission folder {path} holds no <sent_id>.png files", hint=f"expected {FORMAT_HINT}")
    # Hash the files actually used: the listing sorted by name, each with its content hash.
    return Submission(path=path, format="png-folder", sha256=_sha256_folder([e["png"] for e in entries]), entries=entries)


def _png_rle(path: Path, height: int, width: int) -> tuple[dict | None, str | None]:
    """(pycocotools RLE, None) of a PNG mask, or (None, what is wrong with it)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return None, "decodable"
            if im.size != (width, height):
                return None, f"size:{im.size[1]}x{im.size[0]}"
            a = np.asarray(im)
    except FileNotFoundError:
        return None, "missing"
    except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        return None, "decodable"
    fg = a != 0 if a.ndim == 2 else (a != 0).any(axis=2)  # [H, W]
    return mask_utils.encode(np.asfortranarray(fg, dtype=np.uint8)), None


def match(sub: Submission, truth: Truth) -> list[dict]:
    """The submission's masks as pycocotools RLEs in the order of `truth`, every check passed.

    Refuses (one RefbenchError line, the first kind of problem with its count and first
    offenders; the others counted in the hint) unknown or repeated sent_ids, missing
    sentences, masks of the wrong size and RLEs or PNGs that do not decode.
    """
    index = {sid: i for i, sid in enumerate(truth.sent_id)}
    slot: list[dict | None] = [None] * len(truth)
    problems = _Problems()
    for e in sub.entries:
        i = index.get(e["sent_id"])
        if i is None:
            problems.add(f"name a sent_id that is not in this split ({len(truth)} sentences)", e["where"])
        elif slot[i] is not None:
            problems.add("repeat a sent_id", e["where"])
        else:
            slot[i] = e
    missing = [sid for sid, e in zip(truth.sent_id, slot) if e is None]
    for sid in missing:
        problems.add("have no mask in the submission", f"sent_id {sid}", out_of=len(truth))

    encoded: dict[int, bytes] = {}  # slot -> counts of every RLE entry of the right size, checked at once
    for i, (e, h, w) in enumerate(zip(slot, truth.height, truth.width)):
        if e is not None and "rle" in e and list(e["rle"]["size"]) == [h, w]:
            try:
                encoded[i] = e["rle"]["counts"].encode("ascii")
            except UnicodeEncodeError:
                pass
    decodes = dict(zip(encoded, rles_ok(list(encoded.values()), [truth.height[i] * truth.width[i] for i in encoded])))
    rles: list[dict] = []
    for i, (e, h, w) in enumerate(zip(slot, truth.height, truth.width)):
        if e is None:
            continue
        if "rle" in e:
            rle = e["rle"]
            if list(rle["size"]) != [h, w]:
                problems.add("have a mask whose size is not its image's [H, W]", f"{e['where']}: {rle['size']} vs [{h}, {w}]")
                continue
            if not decodes.get(i, False):
                problems.add("have an RLE that does not decode to an H x W mask", e["where"])
                continue
            rles.append({"size": [h, w], "counts": encoded[i]})
        else:
            rle, wrong = _png_rle(e["png"], h, w)
            if wrong is None:
                rles.append(rle)
            elif wrong == "missing":
                problems.add("name a PNG file that does not exist", e["where"])
            elif wrong.startswith("size:"):
                problems.add("have a mask whose size is not its image's [H, W]", f"{e['where']}: {wrong[5:]} vs {h}x{w}")
            else:
                problems.add("have a PNG that does not decode (or is not a PNG)", e["where"])
    problems.raise_if_any(sub.path, len(sub.entries))
    return rles


# --------------------------------------------------------------------------- refbench score


@dataclass
class Scored:
    """What `score_submission` computed (and published, unless dry)."""

    record: Path | None
    submission: Submission
    sentences: dict  # the per-sentence columns handed to results.write_record
    metrics: dict  # metrics.summarize of I/U


def check_protocol(name: str) -> metrics.Protocol:
    """The protocol `name` if it applies to binary masks at the original size, else one line why not."""
    proto = metrics.get_protocol(name)
    if not metrics.takes_binary_masks(proto):
        usable = ", ".join(p.name for p in metrics.PROTOCOLS.values() if metrics.takes_binary_masks(p))
        raise RefbenchError(
            f"protocol {name!r} compares at the network input ({proto.resolution} resolution) and needs the model's "
            f"probability map; a submission of binary masks can be scored under: {usable}",
            hint="score the checkpoint itself with `refbench eval --protocol " + name + "`",
        )
    return proto


def score_submission(
    predictions: str | Path,
    *,
    dataset: str,
    split: str,
    method: str,
    variant: str = "default",
    shards: str | Path = "shards",
    protocol: str = metrics.DEFAULT_PROTOCOL,
    results: str | Path = "leaderboard/results",
    note: str = "",
    command: str | None = None,
) -> Scored:
    """Validate a submission against the split's GT, count I/U and publish a result record."""
    from refbench.data import shards as data
    from refbench.eval import results as results_mod
    _refuse_gres(dataset, "score_submission")
    check_protocol(protocol)
    if not method or not method.strip():
        raise RefbenchError("--method must name the method (e.g. LAVT)")
    dataset_dir = remote.join(shards, dataset)  # a folder or a URL
    manifest = data.load_manifest(dataset_dir)
    with collector_paused():  # the submission and the split's GT: many small objects kept alive, no cycles
        sub = read_submission(predictions)
        truth = ground_truth(dataset_dir, manifest, split=split)
        pred = match(sub, truth)
        inter, union = count_iu(pred, truth.rle)
    columns = {
        "sent_id": truth.sent_id, "ref_id": truth.ref_id, "image_id": truth.image_id,
        "category_id": truth.category_id, "sent": truth.sent, "I": inter, "U": union,
    }
    path = results_mod.write_record(
        results, dataset=dataset, split=split, protocol=protocol, threshold=None,
        model=results_mod.ModelInfo(name=method, variant=variant, run="submitted"),
        data=results_mod.DataInfo(
            manifest_sha256=remote.sha256(remote.join(dataset_dir, "manifest.json")),
            sentences_expected=manifest["splits"][split]["sentences"],
            synthetic=bool(manifest.get("synthetic", False)),
        ),
        sentences=columns, command=command, source="submitted",
        submission={
            "file": str(sub.path), "format": sub.format, "sha256": sub.sha256,
            "entries": len(sub.entries), "note": note,
        },
    )
    return Scored(record=path, submission=sub, sentences=columns, metrics=metrics.summarize_protocol(inter, union, protocol))


def main(predictions: Path, dataset: str, split: str, method: str, variant: str, shards: Path, protocol: str,
         results: Path, note: str) -> Scored:
    """`refbench score`: score a submission, publish its record and print what it says."""
    from rich.console import Console
    from rich.table import Table

    from refbench.eval import results as results_mod
    out = score_submission(predictions, dataset=dataset, split=split, method=method, variant=variant,
                           shards=shards, protocol=protocol, results=results, note=note)
    rec = results_mod.load_record(out.record)
    m = rec.metrics
    proto = rec.protocol
    synthetic = " (synthetic data)" if rec.meta["data"].get("synthetic") else ""
    table = Table(title=f"submitted {method}/{variant} on {dataset}/{split}{synthetic}, protocol "
                        f"{proto['name']} v{proto['version']}: {proto['description']}", title_justify="left")
    for col in ("n", "mIoU % [95% CI]", "oIoU % [95% CI]", *[f"{k} %" for k in metrics.PR_KEYS]):
        table.add_column(col, justify="right")
    ci = m["ci95"]
    table.add_row(
        str(m["n"]),
        f"{100 * m['mIoU']:.2f} [{100 * ci['mIoU'][0]:.2f}, {100 * ci['mIoU'][1]:.2f}]",
        f"{100 * m['oIoU']:.2f} [{100 * ci['oIoU'][0]:.2f}, {100 * ci['oIoU'][1]:.2f}]",
        *[f"{100 * m[k]:.2f}" for k in metrics.PR_KEYS],
    )
    console = Console()
    console.print(table)
    console.print(f"submission: {out.submission.path} ({out.submission.format}, sha256 {out.submission.sha256})")
    console.print(f"record: {out.record}")
    return out


def iter_png_lines(entries: Iterable[tuple[int, str]]) -> Iterator[str]:
    """JSONL lines of a PNG-path submission from (sent_id, relative path) pairs."""
    for sid, rel in entries:
        yield json.dumps({"sent_id": int(sid), "png": rel}) + "\n"


def rle_line(sent_id: int, rle: dict) -> str:
    """One line of an RLE submission: {"sent_id", "rle": {"size", "counts": str}}."""
    counts = rle["counts"]
    return json.dumps({
        "sent_id": int(sent_id),
        "rle": {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts},
    }) + "\n"


def write_jsonl(path: str | Path, lines: Iterable[str]) -> None:
    """Write JSONL atomically; gzip-compressed when the name ends in .gz."""
    text = "".join(lines).encode()
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(text)
        text = buf.getvalue()
    fsutil.atomic_write_bytes(path, text)
