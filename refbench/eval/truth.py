"""The ground truth of a split, read from the shards for the scorers (no JPEG decoded): every
sentence with its ids, image size, text and GT RLE, in the stable order of the shards.

    SentenceColumns       the columns every scorer keeps; `add` appends one sentence
    Truth                 RefCOCO-style splits (+ ann_id, category_id): refbench.eval.score
    split_refs            (image, ref, GT RLE) of every ref, each mask checked against its image
    check_sentence_count  the shards' sentences against the manifest's count
    ground_truth          a RefCOCO-style split's Truth

refbench.eval.gres_score's GresTruth extends SentenceColumns with gRefCOCO's target counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from refbench import remote
from refbench.errors import RefbenchError


@dataclass
class SentenceColumns:
    """The columns every scorer keeps per sentence of a split, in the stable order of the shards
    (columns of equal length); `Truth` (RefCOCO) and refbench.eval.gres_score.GresTruth add theirs."""

    sent_id: list[int] = field(default_factory=list)
    ref_id: list[int] = field(default_factory=list)
    image_id: list[int] = field(default_factory=list)
    file_name: list[Any] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    sentence: list[str] = field(default_factory=list)  # the raw text (the refs pickle's `raw`)
    sent: list[str] = field(default_factory=list)  # the cleaned text refbench tokenizes (the records' `sent`)
    rle: list[dict] = field(default_factory=list)  # GT mask as pycocotools RLE {"size", "counts": bytes}

    def __len__(self) -> int:
        return len(self.sent_id)

    def add(self, meta: dict, ref: dict, sentence: dict, gt: dict) -> None:
        """Append one sentence of `ref` in image `meta` with its GT RLE `gt` to the shared columns."""
        self.sent_id.append(int(sentence["sent_id"]))
        self.ref_id.append(int(ref["ref_id"]))
        self.image_id.append(int(meta["image_id"]))
        self.file_name.append(meta.get("file_name"))
        self.height.append(meta["height"])
        self.width.append(meta["width"])
        self.sentence.append(sentence.get("raw") or sentence["sent"])
        self.sent.append(sentence["sent"])
        self.rle.append(gt)


@dataclass
class Truth(SentenceColumns):
    """Every sentence of one RefCOCO-style split with its GT mask."""

    ann_id: list[Any] = field(default_factory=list)
    category_id: list[int] = field(default_factory=list)


def split_refs(dataset_dir: str | Path, manifest: dict, split: str, problem=None) -> Iterator[tuple[dict, dict, dict]]:
    """(image meta, ref, GT RLE with bytes counts) of every ref of `split`, in the shards' order.

    Shards are checked against the manifest (sha256, sample count) as they are read. A ref whose
    mask is not at its image's size, or for which `problem(ref)` returns a reason, is one line
    naming the image and the ref (re-run prepare)."""
    from refbench.data import shards as data

    for meta in data.split_images(dataset_dir, manifest, split=split):
        h, w = meta["height"], meta["width"]
        for ref in meta["refs"]:
            m = ref["mask"]
            if list(m.get("size", ())) != [h, w] or not isinstance(m.get("counts"), str):
                why = f"has a GT mask of size {m.get('size')}, the image is [{h}, {w}]"
            else:
                why = problem(ref) if problem is not None else None
            if why:
                raise RefbenchError(f"{dataset_dir}: image {meta['image_id']} ref {ref['ref_id']} {why}",
                                    hint="re-run `refbench prepare` for this dataset")
            yield meta, ref, {"size": [h, w], "counts": m["counts"].encode()}


def check_sentence_count(dataset_dir, manifest: dict, split: str, found: int) -> None:
    """One line unless the shards held as many sentences of `split` as the manifest lists."""
    expected = manifest["splits"][split]["sentences"]
    if found != expected:
        raise RefbenchError(f"{dataset_dir}/{split}: the shards hold {found} sentences, the manifest lists {expected}",
                            hint="re-run `refbench prepare` for this dataset")


def ground_truth(dataset_dir: str | Path, manifest: dict | None = None, *, split: str) -> Truth:
    """The sentences of `split` with their GT masks, read from the shards (no JPEG decoded).

    Shards are checked against the manifest (sha256, sample count) as they are read; the
    sentence count must equal the manifest's.
    """
    from refbench.data import shards as data

    dataset_dir = dataset_dir if remote.is_url(dataset_dir) else Path(dataset_dir)  # a folder or a URL
    manifest = data.load_manifest(dataset_dir) if manifest is None else manifest
    truth = Truth()
    for meta, ref, gt in split_refs(dataset_dir, manifest, split):
        for s in ref["sentences"]:
            truth.add(meta, ref, s, gt)
            truth.ann_id.append(ref.get("ann_id"))
            truth.category_id.append(int(ref["category_id"]))
    check_sentence_count(dataset_dir, manifest, split, len(truth))
    return truth
