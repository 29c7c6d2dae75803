"""The baselines `refbench bench` measures refbench against: what other RIS code does, kept apart from the product.

- `shard_plan` + `write_floor`: the floor of `refbench prepare`, the same JPEG files read and
  written with `tarfile` into tars of the same images per shard, fsynced, by one process.
- `ReferStyleDataset`: what CRIS/LAVT-style datasets do per sample (full PIL decode,
  pycocotools polygons, PIL letterbox, torchvision normalise), for the loader benchmark.
- `png_mask` / `raw_bytes`: the raw form of a partition (JPEG files plus one 8-bit PNG mask per
  ref, as many RIS codebases keep them), for the shard-size benchmark.

Nothing in refbench's data path imports this module.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils

from refbench.data import text, transforms
from refbench.data.sources import refer


def shard_plan(raw: Path, dataset: str, split_by: str, shard_size: int) -> list[tuple[str, list[tuple[str, Path]]]]:
    """The images prepare puts in each shard: [(relative tar path, [(member key, JPEG path)])].

    Per split, images sorted by id, cut every `shard_size` (docs/shards.md), from the refs pickle
    and instances.json; the floor writes the same grouping.
    """
    refs_path = raw / dataset / f"refs({split_by}).p"
    splits, _ = refer.join(refer.load_refs(refs_path), refer.load_instances(raw / dataset / "instances.json"), refs_path)
    images = raw / "images" / "train2014"
    plan = []
    for split, entries in splits.items():
        for k in range(0, len(entries), shard_size):
            members = [(f"{e['image_id']:012d}", images / e["file_name"]) for e in entries[k:k + shard_size]]
            plan.append((f"{split}/{split}-{k // shard_size:06d}.tar", members))
    return plan


def write_floor(plan: list[tuple[str, list[tuple[str, Path]]]], out: Path) -> int:
    """The floor of prepare: read each JPEG's bytes and add them to its tar (`tarfile`), fsync each tar.

    One process, no parsing, no masks, no JSON, no hashing. Returns the bytes written.
    """
    total = 0
    for rel, members in plan:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, jpeg in members:
                    data = jpeg.read_bytes()
                    info = tarfile.TarInfo(f"{key}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
            total += f.tell()
    return total


class ReferStyleDataset:
    """A map-style dataset over refs doing per sample what CRIS/LAVT-style RIS datasets do.

    At init (once, untimed by the benchmark): the refs pickle and instances.json are read and
    indexed (as the refer toolkit's REFER class), and every sentence is tokenized (as LAVT does;
    CRIS tokenizes per sample, so this favours the baseline). Per sample (ref): open and fully
    decode its JPEG with PIL, rasterise the annotation's polygons with pycocotools and take their
    union (the refer toolkit's getMask), letterbox both to `size` x `size` (`transforms.Letterbox`
    geometry: PIL bilinear resize of the image, PIL nearest of the mask, pasted centred on zeros),
    torchvision `to_tensor` + `normalize` with the CLIP mean/std. Batches come from torch's
    DataLoader with its default collate. Where the JPEG draft does not apply (input side > 1/4 of
    the image's), the outputs equal `data.train_loader`'s for the same ref and sentence: masks and
    tokens exactly, images to +-1 grey level (PIL's and torch's uint8 resize round differently).
    """

    def __init__(self, raw: Path, dataset: str, split_by: str, split: str, size: int):
        refs = refer.load_refs(raw / dataset / f"refs({split_by}).p")
        self.inst = refer.load_instances(raw / dataset / "instances.json")
        self.images, self.size = raw / "images" / "train2014", size
        self.refs = [r for r in refs if r["split"] == split]
        sentences = [s["sent"] for r in self.refs for s in r["sentences"]]
        ids, _ = text.tokenize_with_lengths(sentences, text.context_length(dataset))  # [N, L]
        self.tokens, k = [], 0
        for r in self.refs:  # per ref: its sentences' token rows
            self.tokens.append(ids[k:k + len(r["sentences"])])
            k += len(r["sentences"])

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        return self.item(i, int(np.random.randint(len(self.refs[i]["sentences"]))))

    def item(self, i: int, k: int) -> dict:
        """Ref i with its sentence k: image float[3,S,S], tokens int64[L], mask float[1,S,S], ids."""
        ref = self.refs[i]
        im, ann = self.inst.images[ref["image_id"]], self.inst.anns[ref["ann_id"]]
        image = Image.open(self.images / im["file_name"]).convert("RGB")  # full decode
        m = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"]))  # uint8 [H, W, K]
        m = (m.sum(axis=2) if m.ndim == 3 else m) > 0  # union of the polygons, bool [H, W]
        box = transforms.Letterbox.fit(image.width, image.height, self.size)
        region = (slice(None), slice(box.pad_y, box.pad_y + box.new_h), slice(box.pad_x, box.pad_x + box.new_w))
        x = torch.zeros(3, self.size, self.size)  # [3, S, S]
        small = image.resize((box.new_w, box.new_h), Image.Resampling.BILINEAR)
        x[region] = TF.normalize(TF.to_tensor(small), transforms.CLIP_MEAN, transforms.CLIP_STD)
        y = torch.zeros(1, self.size, self.size)  # [1, S, S]
        small_mask = Image.fromarray(m.astype(np.uint8)).resize((box.new_w, box.new_h), Image.Resampling.NEAREST)
        y[region] = torch.from_numpy(np.array(small_mask)).float()
        s = ref["sentences"][k]
        return {"image": x, "tokens": torch.as_tensor(self.tokens[i][k], dtype=torch.int64), "mask": y,
                "sent_id": s["sent_id"], "ref_id": ref["ref_id"]}


def png_mask(mask) -> bytes:
    """A 0/1 mask as the 8-bit greyscale PNG (0/255) many RIS codebases keep per ref (PIL defaults)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def raw_bytes(raw: Path, dataset: str, split_by: str) -> dict[str, int]:
    """Bytes of the raw form of one partition's refs: {"jpeg": JPEG files, "png": one PNG mask per ref}."""
    refs_path = raw / dataset / f"refs({split_by}).p"
    splits, _ = refer.join(refer.load_refs(refs_path), refer.load_instances(raw / dataset / "instances.json"), refs_path)
    jpeg = png = 0
    for entries in splits.values():
        for e in entries:
            jpeg += (raw / "images" / "train2014" / e["file_name"]).stat().st_size
            for r in e["refs"]:
                png += len(png_mask(refer.decode_mask(refer.mask_rle(r["segmentation"], e["height"], e["width"]))))
    return {"jpeg": jpeg, "png": png}
