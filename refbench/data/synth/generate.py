"""`refbench synth`: a synthetic referring dataset in exactly the raw REFER layout.

The embedded default dataset: what the tests and the CPU quickstart train on, read by the real
loaders unchanged. `main(out, images, seed)` writes

    OUT/refcoco/refs(unc).p   OUT/refcoco+/refs(unc).p   OUT/refcocog/refs(umd).p  refs(google).p
    OUT/<dataset>/instances.json (one per dataset folder, COCO style)
    OUT/grefcoco/grefs(unc).json + instances.json (gRefCOCO: multi- and no-target refs on the same scenes, refbench.data.synth.gref)
    OUT/images/train2014/COCO_train2014_%012d.jpg
    OUT/SYNTH.json            (marker: seed, image count; lets a re-run overwrite its own output)

Scenes. Each image (width 224..320, height 192..272, landscape and portrait) is a smooth muted
gradient with light noise and 3 flat-coloured shapes (30%..50% of the shorter side). The
categories are shapes with COCO-style ids in two groups playing RefCOCO's people/objects: "round"
(circle, ring, ellipse, semicircle) and "angular" (square, triangle, star, cross). A scene belongs
to one group: it holds at least 3 objects of it (drawn from 2-3 of its shapes and 2-4 colours, so
same-shape and same-colour distractors are common), plus distractors of the other group when
`SynthConfig.objects` allows more than 3 (the default scene has exactly 3); all its refs target objects of its group, chosen uniformly among the describable ones, so a model that
ignores language cannot do better than guessing among >= 3 objects. A ring is two half-annulus
polygons and a cross two overlapping bars (fat ones, like the star: the defaults were tuned so
that the tiny EAVL of the quickstart reaches its quality bar in ten CPU minutes) (the refer toolkit sums polygons, so the bars' overlap
reads 2 there; the GT is the nonzero union).

Overlaps and occlusion. About a quarter of the objects may overlap an earlier one by up to 20%
of their summed radii; objects are drawn in list (z) order. An annotation is the object's full
(amodal) shape, the polygons it was drawn with, also where a later object covers part of it;
overlaps are small, so the hidden part is a few pixels of the mask at most.

Annotations: instances.json lists every object (referred or not) with bbox [x, y, w, h] of its
polygons, area = pixel area of the union of its polygons (pycocotools, as COCO computes it),
iscrowd 0 and the polygons. Image and annotation ids are random unique COCO-range ints. All
three dataset folders share the images (as RefCOCO and RefCOCO+ do), so their instances.json
are identical.

Sentences identify the target uniquely among the scene's objects. A description is a subset of
{shape, colour} (the candidates: objects matching it) plus at most one relation that picks the
target among the candidates with a margin: left/right/top/bottom (and corners, middle), measured
on object centres with a 10%-of-side margin, or bigger/smaller (diameter ratio >= 1.25).
- refcoco (unc): short, mostly colour + shape, about 60% with a location word ("left red
  circle", "the square on the right", "bigger star", "bottom left blue shape"); the weights are
  `SynthConfig.full_weight`, `location_weight`, `generic_weight`.
- refcoco+ (unc, same images and splits): appearance only (colour, shape, size), never a location
  word; only objects so describable are targeted.
- refcocog (umd and google: the same refs, two split partitions): a description plus a relation to
  the nearest other object ("the red circle to the left of a blue square"), ~9 words on average;
  about 5% use a long template that exceeds 22 CLIP tokens, so truncation is exercised.
`raw` varies case and punctuation ("The RED circle, on the left."); `sent` = `clean(raw)`, the
lower-case form without punctuation; `tokens` = `sent.split()`.

Splits are image-disjoint: unc train/val/testA/testB (testA = round scenes, testB = angular
scenes; train and val mix both), umd train/val/test, google train/val; proportions in
`SynthConfig`.

Determinism: everything about image i comes from `numpy.random.default_rng([seed, 1, i])` and the
global choices (ids, groups, splits) from `default_rng([seed, 0])`; nothing reads the clock or
the pid, and the per-image work is independent of how it is spread over processes. So a seed gives
byte-identical files (on one pillow/libjpeg build) whatever the core count. JPEGs are written
first, then instances.json, then the refs pickles (protocol 2), each JSON/pickle atomically.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.table import Table

from refbench import __version__
from refbench.data.datasets import DATASETS, PARTITIONS
from refbench.data.sources import hf as refer_hf
from refbench.data.sources.refer import split_order
from refbench.data.synth import gref as synth_gref
from refbench.data.synth.language import (
    LOCATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    STYLES,
    clean,
    descriptions,
    raw_expression,
)
from refbench.data.synth.render import noise_tile_cached, render
from refbench.data.synth.scene import (
    CATEGORIES,
    CATEGORY_ID,
    COLOURS,
    GROUPS,
    SHAPES_OF,
    SynthConfig,
    compose,
    place,
    polygons,
)
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write_bytes, atomic_write_json, check_output_folder

__all__ = ["CATEGORIES", "COLOURS", "DEFAULT_IMAGES", "GROUPS", "LOCATION_WORDS", "PARTITIONS", "SHAPE_WORDS",
           "SynthConfig", "clean", "generate", "identity", "is_complete", "main", "written_identity"]

DEFAULT_IMAGES = 2000  # synth + prepare --all in ~15 s on 2 cores; enough for the quickstart


def _make_image(args) -> dict:
    """Everything about image i (scene, JPEG written to disk, sentences per dataset) from its own rng."""
    seed, i, group, path, cfg = args
    rng = np.random.default_rng([seed, 1, i])
    w, h = int(rng.integers(cfg.width[0], cfg.width[1] + 1)), int(rng.integers(cfg.height[0], cfg.height[1] + 1))
    for _ in range(1000):
        objs = compose(group, cfg, rng)
        if not place(objs, w, h, cfg, rng):
            continue
        every = {j: descriptions(objs, j, w, h, cfg, True) for j in range(len(objs))}
        usable, pools = {}, {}
        for ds, style in STYLES.items():
            usable[ds] = {j: [d for d in every[j] if style.location or d.rel is None or d.rel in SIZE_WORDS]
                          for j in every if not style.group_only or objs[j].shape in SHAPES_OF[group]}
            pools[ds] = [j for j, descs in usable[ds].items() if descs]
        if all(len(p) >= cfg.refs_per_image[0] for p in pools.values()):
            break
    else:
        raise RuntimeError(f"no scene of image {i} satisfies the synth config {cfg}")
    for o in objs:
        polygons(o, w, h, rng, cfg)
    _write_bytes(path, render(objs, w, h, cfg, rng, noise_tile_cached(seed, cfg.noise_sigma, max(512, cfg.width[1], cfg.height[1]))))

    side = min(w, h)
    refs = {}
    for ds, style in STYLES.items():
        pool = pools[ds]
        k = min(len(pool), int(rng.integers(cfg.refs_per_image[0], cfg.refs_per_image[1] + 1)))
        refs[ds] = []
        for t in sorted(int(j) for j in rng.choice(pool, size=k, replace=False)):  # uniform among the describable
            sents = []
            for _ in range(int(rng.choice([1, 2, 3], p=getattr(cfg, style.counts)))):
                raw = raw_expression(style.sentence(usable[ds][t], objs, t, side, cfg, rng), rng)
                sents.append((raw, clean(raw)))
            refs[ds].append((t, sents))
    refs["grefcoco"] = synth_gref.image_refs(objs, refs["refcoco"], w, h, cfg, np.random.default_rng([seed, 2, i]))
    return {"width": w, "height": h, "objects": [(o.shape, o.polys) for o in objs], "refs": refs}


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:  # many small files: plain writes (the refs pickles, written last, commit the set)
        f.write(data)


# ---------------------------------------------------------------------------------- the dataset


def _split_counts(n: int, fractions) -> list[int]:
    return [max(1, round(f * n)) for f in fractions]


def _splits(n: int, groups: list[str], cfg: SynthConfig, rng) -> dict[str, list[str]]:
    """Image-disjoint split names per partition (unc, umd, google), index-aligned with the images."""
    n_val, n_a, n_b = _split_counts(n, cfg.unc_fractions)
    unc = ["train"] * n
    for grp, name, count in ((GROUPS[0], "testA", n_a), (GROUPS[1], "testB", n_b)):
        for i in rng.permutation([i for i in range(n) if groups[i] == grp])[:count]:
            unc[i] = name
    for i in rng.permutation([i for i in range(n) if unc[i] == "train"])[:n_val]:
        unc[i] = "val"
    umd, google = ["train"] * n, ["train"] * n
    order = rng.permutation(n)
    n_val, n_test = _split_counts(n, cfg.umd_fractions)
    for i in order[:n_val]:
        umd[i] = "val"
    for i in order[n_val:n_val + n_test]:
        umd[i] = "test"
    for i in rng.permutation(n)[:_split_counts(n, [cfg.google_val_fraction])[0]]:
        google[i] = "val"
    return {"unc": unc, "umd": umd, "google": google}


def _check_out(out: Path) -> None:
    """Refuse to write over REFER/COCO files this command did not write (e.g. real RefCOCO)."""
    if (out / "SYNTH.json").exists():
        return
    ours = [out / ds / f"refs({sb}).p" for ds, sb in PARTITIONS] + [out / ds / "instances.json" for ds, _ in PARTITIONS]
    ours += [out / "grefcoco" / "grefs(unc).json", out / "grefcoco" / "instances.json"]
    found = [p for p in ours if p.exists()] + sorted(p for ds, _ in PARTITIONS for p in (out / ds / "data").glob("*.parquet"))
    img_dir = out / "images" / "train2014"
    if found or (img_dir.is_dir() and any(img_dir.iterdir())):
        raise RefbenchError(
            f"{out} already holds REFER/COCO files not written by `refbench synth` ({found[0] if found else img_dir})",
            hint="choose another --out; synth only overwrites its own output (marked by SYNTH.json)",
        )


def identity(images: int, seed: int, cfg: SynthConfig = SynthConfig()) -> dict:
    """What SYNTH.json records of a dataset (JSON types): equal identities, byte-identical datasets."""
    return {"seed": seed, "images": images, "config": json.loads(json.dumps(asdict(cfg)))}


def written_identity(out: Path) -> dict | None:
    """The identity of the synthetic dataset in OUT (None: no SYNTH.json there), complete or not."""
    marker = Path(out) / "SYNTH.json"
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text())
    return {k: made.get(k) for k in ("seed", "images", "config")}


def is_complete(out: Path) -> bool:
    """Whether `generate` finished writing OUT (the last refs pickle it writes is there)."""
    ds, sb = PARTITIONS[-1]
    return (Path(out) / ds / f"refs({sb}).p").is_file()


def generate(out: Path, images: int, seed: int, cfg: SynthConfig = SynthConfig(), workers: int | None = None,
             parquet: bool = False) -> dict:
    """Write the dataset; returns the counts summary. `workers` processes render the images.

    `parquet`: also write each dataset as a Hugging Face parquet mirror snapshot (refbench.data.sources.hf:
    OUT/<dataset>/README.md + data/*.parquet, the partitions the mirrors hold), from the refs
    pickles and instances.json just written: same refs, same ids.
    """
    if images < 20:
        raise RefbenchError(f"--images {images} is too small: the splits need at least 20 images")
    out = Path(out)
    _check_out(out)
    img_dir = out / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "SYNTH.json", {"generator": "refbench synth", "refbench_version": __version__,
                                           **identity(images, seed, cfg)})
    for stale in img_dir.glob("COCO_train2014_*.jpg"):  # our previous output (SYNTH.json marks the folder)
        stale.unlink()
    for ds in DATASETS:  # a parquet snapshot of a previous run
        for stale in [*(out / ds / "data").glob("*.parquet"), out / ds / "README.md"]:
            stale.unlink(missing_ok=True)

    rng = np.random.default_rng([seed, 0])
    image_ids = [int(x) + 1 for x in rng.choice(581_929, size=images, replace=False)]
    ann_ids = iter(int(x) + 1 for x in rng.choice(2_300_000, size=images * cfg.objects[1], replace=False))
    groups = [GROUPS[int(g)] for g in rng.permutation(np.arange(images) % 2)]
    splits = _splits(images, groups, cfg, rng)
    file_names = [f"COCO_train2014_{iid:012d}.jpg" for iid in image_ids]
    tasks = [(seed, i, groups[i], img_dir / file_names[i], cfg) for i in range(images)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            scenes = pool.map(_make_image, tasks, chunksize=max(1, images // (8 * workers)))
    else:
        scenes = [_make_image(t) for t in tasks]

    coco_images, annotations, ann_of = [], [], []
    for i, sc in enumerate(scenes):
        coco_images.append({"license": 1, "file_name": file_names[i], "coco_url": "", "height": sc["height"],
                            "width": sc["width"], "date_captured": "", "flickr_url": "", "id": image_ids[i]})
        ids = []
        for shape, polys in sc["objects"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, sc["height"], sc["width"]))
            xs, ys = [v for p in polys for v in p[0::2]], [v for p in polys for v in p[1::2]]
            ann_id = next(ann_ids)
            annotations.append({
                "segmentation": polys, "area": float(mask_utils.area(rle)), "iscrowd": 0, "image_id": image_ids[i],
                "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                "category_id": CATEGORY_ID[shape], "id": ann_id,
            })
            ids.append(ann_id)
        ann_of.append(ids)
    instances = {
        "info": {"description": "refbench synthetic REFER data", "version": __version__, "seed": seed},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": coco_images, "annotations": annotations,
        "categories": [{"supercategory": g, "id": cid, "name": name} for cid, name, g in CATEGORIES],
    }
    blob = json.dumps(instances, separators=(",", ":")).encode()
    for ds in DATASETS:
        atomic_write_bytes(out / ds / "instances.json", blob)

    summary = {"out": str(out), "images": images, "seed": seed, "datasets": {}}
    summary["datasets"]["grefcoco_unc"] = _write_grefcoco(out, scenes, blob, ann_of, image_ids, file_names, splits["unc"])
    for ds in DATASETS:
        refs = []
        sent_id = 0
        for i, sc in enumerate(scenes):
            for t, sents in sc["refs"][ds]:
                ann_id = ann_of[i][t]
                sentences = []
                for raw, sent in sents:
                    sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent})
                    sent_id += 1
                refs.append({
                    "sent_ids": [s["sent_id"] for s in sentences], "file_name": f"{file_names[i][:-4]}_{ann_id}.jpg",
                    "ann_id": ann_id, "ref_id": len(refs), "image_id": image_ids[i], "split": None,
                    "sentences": sentences, "category_id": CATEGORY_ID[sc["objects"][t][0]],
                })
        index = {iid: i for i, iid in enumerate(image_ids)}
        for sb in [sb for d, sb in PARTITIONS if d == ds]:
            part = [dict(r, split=splits[sb][index[r["image_id"]]]) for r in refs]
            atomic_write_bytes(out / ds / f"refs({sb}).p", pickle.dumps(part, protocol=2))
            summary["datasets"][f"{ds}_{sb}"] = _counts(part)
    if parquet:
        summary["parquet"] = {ds: [str(p) for p in refer_hf.convert_refer(out, ds)] for ds in refer_hf.MIRRORS}
    return summary


def _write_grefcoco(out: Path, scenes: list[dict], blob: bytes, ann_of: list, image_ids: list, file_names: list,
                    unc: list[str]) -> dict:
    """OUT/grefcoco/instances.json and grefs(unc).json (refbench.data.synth.gref's refs, refbench.data.sources.grefer's format)."""
    atomic_write_bytes(out / "grefcoco" / "instances.json", blob)
    refs, sent_id = [], 0
    for i, sc in enumerate(scenes):
        for targets, sents in sc["refs"]["grefcoco"]:
            ann_ids = [ann_of[i][t] for t in targets] or [-1]
            sentences = [{"tokens": sent.split(), "raw": raw, "sent_id": sent_id + k, "sent": sent} for k, (raw, sent) in enumerate(sents)]
            sent_id += len(sents)
            refs.append({
                "sent_ids": [s["sent_id"] for s in sentences], "file_name": f"{file_names[i][:-4]}_{ann_ids[0]}.jpg",
                "ann_id": ann_ids, "ref_id": len(refs), "image_id": image_ids[i], "split": unc[i],
                "sentences": sentences, "no_target": not targets,
                "category_id": [CATEGORY_ID[sc["objects"][t][0]] for t in targets] or -1,
            })
    atomic_write_bytes(out / "grefcoco" / "grefs(unc).json", json.dumps(refs, separators=(",", ":")).encode())
    return _counts(refs)


def _counts(refs: list[dict]) -> dict:
    per: dict[str, dict] = {}
    images: dict[str, set] = {}
    for r in refs:
        c = per.setdefault(r["split"], {"images": 0, "refs": 0, "sentences": 0})
        c["refs"] += 1
        c["sentences"] += len(r["sentences"])
        images.setdefault(r["split"], set()).add(r["image_id"])
    for s, c in per.items():
        c["images"] = len(images[s])
    return dict(sorted(per.items(), key=lambda kv: split_order(kv[0])))


def main(out: Path, images: int | None, seed: int, parquet: bool = False) -> dict:
    """`refbench synth`: write the dataset, print a summary table, return the summary dict."""
    check_output_folder(Path(out), "--out")  # before any work
    n = DEFAULT_IMAGES if images is None else images
    console = Console()
    t0 = time.perf_counter()
    with console.status(f"writing {n} synthetic images and their REFER annotations to {out} ..."):
        summary = generate(Path(out), n, seed, parquet=parquet)
    seconds = time.perf_counter() - t0
    table = Table(title=f"refbench synth -> {out}: {n} images, seed {seed}")
    for col in ("dataset", "split", "images", "refs", "sentences"):
        table.add_column(col, justify="left" if col in ("dataset", "split") else "right")
    for name, per in summary["datasets"].items():
        for split, c in per.items():
            table.add_row(name, split, str(c["images"]), str(c["refs"]), str(c["sentences"]))
    console.print(table)
    console.print(f"{n} synthetic images, 4 REFER annotation sets and a gRefCOCO set written in {seconds:.1f} s")
    if parquet:
        console.print(f"parquet mirror snapshots (jxu124 layout): {', '.join(str(Path(out) / ds) for ds in summary['parquet'])} "
                      f"(`refbench prepare --all --source hf --data {out}`)")
    return summary
