"""Loader throughput per CPU core: refbench's train/eval loaders against a refer-style loader.

Not a test (pytest does not collect it); run by hand, e.g.

    python tests/_loader_throughput.py --make 400 --out /tmp/lt          # COCO-size JPEGs
    python tests/_loader_throughput.py --ds shards/refcoco_unc --raw data # prepared synth data

refer-style = what the refer toolkit / CRIS-style loaders do: a map-style torch Dataset over
the refs; per ref it opens and fully decodes the JPEG file with PIL, takes the GT mask (the
instance polygons with pycocotools when --raw is given, else the shard's RLE, which is cheaper)
and applies the SAME transforms (transforms.image_to_tensor / mask_to_tensor); tokens are
precomputed (favouring the baseline); torch DataLoader with shuffle and default collate. Same
batch size, input size and workers for both. Throughput = samples / CPU seconds of this
process plus its joined DataLoader workers, so the numbers hold on a shared machine; torch runs
one intra-op thread (per core). Wall-clock samples/s are printed beside.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refbench import data, refer, transforms  # noqa: E402

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 512)]


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class ReferStyle(torch.utils.data.Dataset):
    """Per ref: full JPEG decode, polygons (raw) or RLE (shards) -> mask, the same transforms."""

    def __init__(self, ds: Path, raw: Path | None, size: int):
        self.size, self.items = size, []  # (jpeg path, ref dict with "mask" RLE or "polygons" + h, w)
        if raw is not None:
            manifest = data.load_manifest(ds)
            refs = refer.load_refs(raw / manifest["dataset"] / f"refs({manifest['split_by']}).p")
            inst = refer.load_instances(raw / manifest["dataset"] / "instances.json")
            for r in refs:
                if r["split"] == "train":
                    im = inst.images[r["image_id"]]
                    self.items.append((raw / "images" / "train2014" / im["file_name"],
                                       {"segmentation": inst.anns[r["ann_id"]]["segmentation"], "h": im["height"], "w": im["width"],
                                        "sentences": [{"sent_id": s["sent_id"], "tokens": [0] * 17} for s in r["sentences"]]}))
        else:
            files = ds.parent / f"{ds.name}-jpeg-files"
            files.mkdir(exist_ok=True)
            for shard in sorted((ds / "train").glob("*.tar")):
                with tarfile.open(shard) as tar:
                    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
                for name, payload in members.items():
                    if name.endswith(".json"):
                        jpg = files / (name[:-5] + ".jpg")
                        jpg.write_bytes(members[name[:-5] + ".jpg"])
                        self.items += [(jpg, r) for r in json.loads(payload)["refs"]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, r = self.items[i]
        x, box = transforms.image_to_tensor(Image.open(path).convert("RGB"), self.size)  # full decode
        if "segmentation" in r:
            mask = refer.decode_mask(refer.mask_rle(r["segmentation"], r["h"], r["w"]))
        else:
            mask = refer.decode_mask(r["mask"])
        s = r["sentences"][np.random.randint(len(r["sentences"]))]
        return {"image": x, "tokens": torch.tensor(s["tokens"]), "mask": transforms.mask_to_tensor(mask, box), "sent_id": s["sent_id"]}


def timed(loader, max_batches: int) -> tuple[int, float, float]:
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    batches = iter(loader)
    for i, b in enumerate(batches):
        n += len(b["sent_id"])
        if i + 1 == max_batches:
            break
    del batches  # joins the workers, so their CPU time is counted
    return n, cpu_seconds() - c0, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ds", type=Path, help="a prepared <dataset>_<splitby> folder")
    p.add_argument("--raw", type=Path, help="its raw REFER data (refer-style baseline rasterises the polygons)")
    p.add_argument("--make", type=int, default=0, help="write a COCO-size dataset of this many train images first")
    p.add_argument("--out", type=Path, default=Path("/tmp/loader-throughput"), help="where --make writes")
    p.add_argument("--sizes", default="128,480")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batches", type=int, default=40, help="train batches of 16 per measurement")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.make:
        from _tiny_shards import write_tiny_dataset

        a.ds, _ = write_tiny_dataset(a.out, images={"train": a.make, "val": a.make // 4}, shard_size=100, sizes=COCO_SIZES, noise=32)
    manifest = data.load_manifest(a.ds)
    jpeg_kb = sum(s["bytes"] for s in manifest["shards"]) / sum(s["samples"] for s in manifest["shards"]) / 1e3
    print(f"{a.ds}: {manifest['splits']['train']['refs']} train refs on {manifest['splits']['train']['images']} images (~{jpeg_kb:.0f} KB per sample)")
    for size in map(int, a.sizes.split(",")):
        for workers in map(int, a.workers.split(",")):
            rows = [
                ("refer-style loader, train refs", torch.utils.data.DataLoader(ReferStyle(a.ds, a.raw, size), batch_size=16, shuffle=True, num_workers=workers), a.batches),
                ("refbench train_loader, train refs", data.train_loader(a.ds, manifest, batch_size=16, image_size=size, workers=workers, num_batches=a.batches), a.batches),
                ("refbench eval_loader, val sentences", data.eval_loader(a.ds, manifest, split="val", batch_size=16, image_size=size, workers=workers), 10**9),
            ]
            for what, loader, n_batches in rows:
                n, cpu, wall = timed(loader, n_batches)
                print(f"input {size:3d}  workers {workers}  {what:36s} {n / cpu:7.1f} samples/CPU-s  {n / wall:7.1f} samples/s wall  ({n} samples)", flush=True)


if __name__ == "__main__":
    main()
