"""A tiny prepared dataset written by hand, following docs/shards.md (schema v1) exactly.

Used by the loader tests (and the loader benchmark) independently of refbench.data.prepare: a few
JPEG images of odd, portrait and landscape sizes, each with 1-3 refs whose masks are known
rectangles/ellipses (stored as COCO RLE via pycocotools), 1-3 sentences per ref tokenized with
the open_clip CLIP tokenizer. `write_tiny_dataset` returns the dataset folder and, for the
tests, the ground truth it wrote.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(64, 48), (37, 53), (80, 80), (33, 61), (90, 41), (50, 50), (45, 70), (71, 39), (40, 40), (61, 77), (55, 34), (48, 64)]
WORDS = ["red", "blue", "green", "left", "right", "top", "big", "small", "box", "ball", "the", "one"]


@dataclass
class TinyTruth:
    """What the tiny dataset holds, for assertions."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)  # ref_id -> uint8 [H, W]
    sentences: dict[str, list[int]] = field(default_factory=dict)  # split -> sent_ids in file order
    refs: dict[str, list[int]] = field(default_factory=dict)  # split -> ref_ids
    jpeg: dict[int, bytes] = field(default_factory=dict)  # image_id -> bytes


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A rectangle or ellipse covering a sizeable part of an h x w image: uint8 [h, w]."""
    mh, mw = int(rng.integers(h // 3, h // 2 + 2)), int(rng.integers(w // 3, w // 2 + 2))
    y0, x0 = int(rng.integers(0, h - mh + 1)), int(rng.integers(0, w - mw + 1))
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.5:
        m = (yy >= y0) & (yy < y0 + mh) & (xx >= x0) & (xx < x0 + mw)
    else:
        cy, cx = y0 + mh / 2, x0 + mw / 2
        m = ((yy + 0.5 - cy) / (mh / 2)) ** 2 + ((xx + 0.5 - cx) / (mw / 2)) ** 2 <= 1
    return m.astype(np.uint8)


def write_tiny_dataset(
    root: Path,
    *,
    images: dict[str, int] | None = None,
    shard_size: int = 2,
    sizes: list[tuple[int, int]] | None = None,
    seed: int = 0,
    context_length: int = 17,
    name: str = "refcoco_unc",
    noise: float = 6.0,
) -> tuple[Path, TinyTruth]:
    """Write `root/<name>/` (shards + manifest.json); returns (dataset folder, ground truth).

    `noise`: std of the pixel noise; it sets the JPEG size (32 gives ~150 KB at 640x480, like COCO).
    """
    import open_clip
    from pycocotools import mask as mask_utils

    from refbench.fsutil import sha256_file

    images = images or {"train": 7, "val": 5}
    sizes = sizes or SIZES
    tokenizer = open_clip.get_tokenizer("RN50", context_length=context_length)
    rng = np.random.default_rng(seed)
    out = root / name
    truth = TinyTruth()
    manifest_shards, splits = [], {}
    image_id, ref_id, sent_id = 1000, 0, 0
    for split, n_images in images.items():
        samples = []
        truth.sentences[split], truth.refs[split] = [], []
        n_refs = n_sents = 0
        for _ in range(n_images):
            image_id += int(rng.integers(1, 50))
            w, h = sizes[int(rng.integers(len(sizes)))]
            ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, size=3) + rng.integers(0, 128, size=3)
            pixels = np.clip(np.broadcast_to(ramp, (h, w, 3)) * 0.5 + rng.normal(0, noise, size=(h, w, 3)) + 40, 0, 255).astype(np.uint8)
            refs = []
            for _ in range(int(rng.integers(1, 4))):
                m = _shape_mask(rng, h, w)
                pixels[m.astype(bool)] = rng.integers(0, 256, size=3)
                rle = mask_utils.encode(np.asfortranarray(m))
                sents = []
                for _ in range(int(rng.integers(1, 4))):
                    text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
                    tokens = tokenizer([text])[0].tolist()
                    sents.append({"sent_id": sent_id, "sent": text, "raw": text.upper(), "tokens": tokens})
                    truth.sentences[split].append(sent_id)
                    sent_id += 1
                refs.append({
                    "ref_id": ref_id, "ann_id": 50000 + ref_id, "category_id": int(rng.integers(1, 91)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "split": split,
                    "mask": {"size": [h, w], "counts": rle["counts"].decode()}, "sentences": sents,
                })
                truth.masks[ref_id] = m
                truth.refs[split].append(ref_id)
                n_refs += 1
                n_sents += len(sents)
                ref_id += 1
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            truth.jpeg[image_id] = buf.getvalue()
            meta = {"image_id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": h, "width": w, "refs": refs}
            samples.append((f"{image_id:012d}", buf.getvalue(), json.dumps(meta).encode()))
        n_shards = 0
        for i in range(0, len(samples), shard_size):
            rel = f"{split}/{split}-{n_shards:06d}.tar"
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            chunk = samples[i : i + shard_size]
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, jpg, js in chunk:
                    for suffix, data in (("jpg", jpg), ("json", js)):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o444
                        tar.addfile(info, io.BytesIO(data))
            metas = [json.loads(js) for _, _, js in chunk]
            manifest_shards.append({
                "split": split, "path": rel, "samples": len(chunk),
                "refs": sum(len(m["refs"]) for m in metas),
                "sentences": sum(len(r["sentences"]) for m in metas for r in m["refs"]),
                "bytes": path.stat().st_size, "sha256": sha256_file(path),
            })
            n_shards += 1
        splits[split] = {"images": n_images, "refs": n_refs, "sentences": n_sents, "shards": n_shards, "truncated_sentences": 0}
    manifest = {
        "schema": "refbench-shards", "schema_version": 1, "dataset": name.rpartition("_")[0], "split_by": name.rpartition("_")[2], "name": name,
        "tokenizer": {"name": "open_clip:RN50", "context_length": context_length, "text_field": "sent", "sot": 49406, "eot": 49407, "pad": 0},
        "categories": {}, "splits": splits, "shards": manifest_shards,
        "sources": {}, "skipped": [], "refbench_version": "test", "options": {"shard_size": shard_size},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out, truth
