"""`refbench bench`: refbench measured against its baselines, side by side in one run.

    refbench bench [prepare|loader|shards|model|eval|score|gpu|all] --workdir bench --images 2000 --log bench/bench.jsonl [--out DIR]

Each benchmark is a function `bench_x(workdir, images) -> list[row]` registered in `BENCHES`.
A row is a dict: bench, what (the quantity, with its unit, data set and setting), ours,
baseline, baseline_is (what the baseline does, in words), ratio (ours / baseline), target
(e.g. "<= 1.15", ">= 3.0", or None for information only) and ok. `main` runs the chosen
benchmarks, prints one rich table and appends one JSON line per run (time, git commit, cores,
load average, torch threads, rows) to the log file, atomically.

Timings are medians over several interleaved repetitions after a warm-up: the two sides
alternate step by step, and a time ratio is the median of the per-repetition ratios, so a
noisy neighbour on the machine slows both sides of a pair alike.

Data. The data benchmarks run on synthetic REFER sets written by `refbench.synth` into the
workdir (reused while their SYNTH.json matches), `images` images each, in two configurations
(`SETS`): "coco-like" (640 x 427..480 px, noise tuned so JPEGs average ~160 KB, like COCO
train2014: the representative one, which carries the targets) and "default" (the embedded
quickstart data: ~250 x 200 px, ~15 KB JPEGs, reported for information). refcoco/unc is the
partition measured; `refbench prepare` output of each set is kept in the workdir for the
loader, shards and eval benchmarks.

- prepare: `prepare.prepare_all` (the work of `refbench prepare`: process pool start, planning,
  shard writing with `--workers` = the core count, commit) vs the floor: the same JPEG files read
  and written into tars of the same images per shard on the same disk, fsynced like prepare's,
  by one Python process with `tarfile` (wall time; CPU time of all processes as information).
- loader: samples per CPU-second of `data.train_loader` vs `ReferStyleDataset`, what CRIS/LAVT
  style datasets do per sample, both in the main process (no DataLoader workers), one torch thread.
- shards: bytes of the refcoco_unc shards vs the raw JPEGs plus one 8-bit PNG mask per ref.
- model: EAVL vs CRIS forward + backward step time.
- score: `refbench score`'s parse + validation + I/U on RLEs vs merely decoding the submitted
  masks, on a synthetic RefCOCO testB-sized submission of COCO-size masks (score_bench.py).
- gpu: EAVL and CRIS rn101 at 480 in bf16 on one GPU (refbench/bench_gpu.py): training samples/s
  and peak memory per batch, channels_last vs NCHW, data-wait share per loader worker count,
  eval sentences/s; one line and no rows without a GPU.
- eval: share of `evaluate.main` wall time spent in metric code (count_iu: mapping back,
  binarising, I/U; metrics.summarize, bootstrap_ci, breakdowns), for a random-init tiny EAVL.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator

from refbench.bench_rows import interleaved as _interleaved
from refbench.bench_rows import median_ratio as _median_ratio
from refbench.bench_rows import row as _row
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write_text
from refbench.synth import SynthConfig

# ---------------------------------------------------------------------------------- settings

MODEL_STEP_TARGET = 1.15  # EAVL fwd+bwd step time <= 1.15 x CRIS's (issue 7)
PREPARE_TARGET = 1.5  # prepare wall time <= 1.5 x the read-and-tar floor (issue 3)
LOADER_TARGET = 3.0  # train loader samples per CPU-second >= 3 x the refer-style loader's (issue 3)
SHARDS_TARGET = 1.1  # shard bytes <= 1.1 x raw JPEGs + PNG masks (issue 7)
EVAL_TARGET = 0.05  # metric code <= 5% of eval wall time (issue 7)

# synthetic data sets: name -> generator config. The first one is representative and carries the targets.
SETS: dict[str, SynthConfig] = {
    "coco-like": SynthConfig(width=(640, 640), height=(427, 480), noise_sigma=24.0),  # ~160 KB JPEGs, like COCO
    "default": SynthConfig(),  # the embedded quickstart data: ~250 x 200 px, ~15 KB JPEGs
}
SEED = 0  # synth seed of the benchmark data
DATASET, SPLIT_BY = "refcoco", "unc"  # the partition the data benchmarks measure

PREPARE_REPS = 3  # timed repetitions per side
PREPARE_WARMUP = 1  # untimed repetitions per side first (they also warm the page cache)

# (input size, batch size, batches per repetition, timed repetitions): the paper's 480 px input
LOADER_SETTINGS: tuple[tuple[int, int, int, int], ...] = ((480, 16, 4, 5),)
LOADER_WARMUP = 2  # untimed batches per side first (fills our shuffle buffer, warms caches)

EVAL_REPS = 2  # timed `refbench eval` runs
EVAL_WARMUP = 1  # untimed runs first
EVAL_SPLIT = "val"  # the split scored
EVAL_WORKERS = 2  # DataLoader workers of the eval loader (`refbench eval`'s default)

MODEL_SETTINGS: tuple[tuple[str, int, int], ...] = (("tiny", 32, 7), ("rn50", 2, 3))  # (variant, batch, timed reps)
MODEL_WARMUP = 2  # untimed steps per model before timing


# ---------------------------------------------------------------------------------- rows


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------- data sets


def synth_set(workdir: Path, name: str, images: int) -> Path:
    """The raw REFER folder of benchmark set `name` with `images` images; generated unless already there."""
    from refbench import synth

    cfg = SETS[name]
    raw = Path(workdir) / f"synth-{name}-{images}"
    if synth.written_identity(raw) == synth.identity(images, SEED, cfg) and synth.is_complete(raw):
        return raw
    synth.generate(raw, images, SEED, cfg)
    return raw


def prepared_set(workdir: Path, name: str, images: int) -> Path:
    """`refbench prepare` output (the refcoco_unc folder) of benchmark set `name`; prepared unless already there."""
    from refbench import prepare

    raw = synth_set(workdir, name, images)
    out = Path(workdir) / f"shards-{name}-{images}"
    folder = out / prepare.dataset_name(DATASET, SPLIT_BY)
    refs_sha = _sha(raw / DATASET / f"refs({SPLIT_BY}).p")
    try:
        if prepare.load_manifest(out, folder.name)["sources"]["refs"]["sha256"] == refs_sha:
            return folder
    except RefbenchError:
        pass
    _prepare(raw, out)
    return folder


def _sha(path: Path) -> str:
    from refbench.fsutil import sha256_file

    return sha256_file(path)


def _prepare(raw: Path, out: Path) -> None:
    """What `refbench prepare --dataset refcoco --split-by unc` does, with its progress display silenced."""
    from rich.console import Console

    from refbench import prepare

    prepare.prepare_all([(DATASET, SPLIT_BY)], raw, raw / "images" / "train2014", out, _cores(), False,
                        prepare.DEFAULT_SHARD_SIZE, console=Console(file=io.StringIO()))


# ---------------------------------------------------------------------------------- prepare


def shard_plan(raw: Path, shard_size: int) -> list[tuple[str, list[tuple[str, Path]]]]:
    """The images prepare puts in each shard: [(relative tar path, [(member key, JPEG path)])].

    Per split, images sorted by id, cut every `shard_size` (docs/shards.md), from the refs pickle
    and instances.json; the floor writes the same grouping.
    """
    from refbench import refer

    refs_path = raw / DATASET / f"refs({SPLIT_BY}).p"
    splits, _ = refer.join(refer.load_refs(refs_path), refer.load_instances(raw / DATASET / "instances.json"), refs_path)
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


def bench_prepare(workdir: Path, images: int) -> list[dict]:
    """`refbench prepare` wall time vs the read-and-tar floor, per benchmark set (see the module docstring)."""
    from refbench import prepare

    rows = []
    for i, name in enumerate(SETS):
        raw = synth_set(workdir, name, images)
        plan = shard_plan(raw, prepare.DEFAULT_SHARD_SIZE)
        out_ours, out_floor = Path(workdir) / f"shards-{name}-{images}", Path(workdir) / f"floor-{name}-{images}"
        cpu: dict[str, list[float]] = {"ours": [], "floor": []}

        def timed(side: str, work: Callable[[], object]) -> float:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            work()
            wall = time.perf_counter() - t0
            cpu[side].append(_cpu_seconds() - c0)
            return wall

        wall = _interleaved({"ours": lambda: timed("ours", lambda: _prepare(raw, out_ours)),
                             "floor": lambda: timed("floor", lambda: write_floor(plan, out_floor))},
                            PREPARE_REPS, PREPARE_WARMUP)
        cpu = {k: v[PREPARE_WARMUP:] for k, v in cpu.items()}
        manifest = prepare.load_manifest(out_ours, prepare.dataset_name(DATASET, SPLIT_BY))
        n = sum(s["samples"] for s in manifest["shards"])
        kb = sum((p.stat().st_size for _, members in plan for _, p in members)) / n / 1e3
        setting = f"{name} synth, {DATASET}_{SPLIT_BY}, {n} images, {kb:.0f} KB/JPEG, {_cores()} workers, median of {PREPARE_REPS}"
        floor_is = "read JPEG bytes + tarfile, same shards and disk, fsync, 1 process"
        target = PREPARE_TARGET if i == 0 else None  # the representative set carries the target
        rows.append(_row("prepare", f"prepare wall, s ({setting})", statistics.median(wall["ours"]),
                         statistics.median(wall["floor"]), target, _median_ratio(wall["ours"], wall["floor"]),
                         baseline_is=floor_is))
        rows.append(_row("prepare", f"prepare CPU, s, all processes ({name} synth)", statistics.median(cpu["ours"]),
                         statistics.median(cpu["floor"]), None, _median_ratio(cpu["ours"], cpu["floor"]),
                         baseline_is=floor_is))
    return rows


# ---------------------------------------------------------------------------------- loader


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
        from refbench import refer, text

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
        import numpy as np

        return self.item(i, int(np.random.randint(len(self.refs[i]["sentences"]))))

    def item(self, i: int, k: int) -> dict:
        """Ref i with its sentence k: image float[3,S,S], tokens int64[L], mask float[1,S,S], ids."""
        import numpy as np
        import torch
        import torchvision.transforms.functional as TF
        from PIL import Image
        from pycocotools import mask as mask_utils

        from refbench import transforms

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


def _cycle(make: Callable[[], object]) -> Iterator[dict]:
    """Batches of `make()`'s iterable, restarted when it ends."""
    while True:
        yield from make()


def _samples_per_cpu_second(batches: Iterator[dict], n: int) -> float:
    c0, count = time.process_time(), 0
    for _ in range(n):
        count += len(next(batches)["sent_id"])
    return count / (time.process_time() - c0)


def bench_loader(workdir: Path, images: int) -> list[dict]:
    """Train loader samples per CPU-second vs `ReferStyleDataset` in a torch DataLoader (same batches, size, data)."""
    import torch

    from refbench import data

    name = next(iter(SETS))
    raw, folder = synth_set(workdir, name, images), prepared_set(workdir, name, images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core; DataLoader workers run one thread each too
    rows = []
    try:
        for size, batch, per_rep, reps in LOADER_SETTINGS:
            base = ReferStyleDataset(raw, DATASET, SPLIT_BY, "train", size)
            g = torch.Generator().manual_seed(SEED)
            theirs = _cycle(lambda: torch.utils.data.DataLoader(base, batch_size=batch, shuffle=True, generator=g, num_workers=0))
            ours = iter(data.train_loader(folder, batch_size=batch, image_size=size, num_batches=10**9, seed=SEED, workers=0))
            for it in (ours, theirs):
                _samples_per_cpu_second(it, LOADER_WARMUP)
            rates = _interleaved({"ours": lambda: _samples_per_cpu_second(ours, per_rep),
                                  "theirs": lambda: _samples_per_cpu_second(theirs, per_rep)}, reps, 0)
            del ours  # stops the stream
            setting = f"{name} synth {DATASET}_{SPLIT_BY} train, {size} px, batch {batch}, no workers, 1 thread, median of {reps}x{per_rep} batches"
            rows.append(_row("loader", f"train_loader samples per CPU-s ({setting})", statistics.median(rates["ours"]),
                             statistics.median(rates["theirs"]), LOADER_TARGET,
                             _median_ratio(rates["ours"], rates["theirs"]), at_least=True,
                             baseline_is="refer-style per ref: PIL full decode, pycocotools polygons, PIL letterbox, torchvision normalise"))
    finally:
        torch.set_num_threads(threads)
    return rows


# ---------------------------------------------------------------------------------- shards


def png_mask(mask) -> bytes:
    """A 0/1 mask as the 8-bit greyscale PNG (0/255) many RIS codebases keep per ref (PIL defaults)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def raw_bytes(raw: Path) -> dict[str, int]:
    """Bytes of the raw form of the refcoco_unc refs: {"jpeg": JPEG files, "png": one PNG mask per ref}."""
    from refbench import refer

    refs_path = raw / DATASET / f"refs({SPLIT_BY}).p"
    splits, _ = refer.join(refer.load_refs(refs_path), refer.load_instances(raw / DATASET / "instances.json"), refs_path)
    jpeg = png = 0
    for entries in splits.values():
        for e in entries:
            jpeg += (raw / "images" / "train2014" / e["file_name"]).stat().st_size
            for r in e["refs"]:
                png += len(png_mask(refer.decode_mask(refer.mask_rle(r["segmentation"], e["height"], e["width"]))))
    return {"jpeg": jpeg, "png": png}


def bench_shards(workdir: Path, images: int) -> list[dict]:
    """Shard bytes vs raw JPEGs + one PNG mask per ref, per benchmark set."""
    from refbench import data

    rows = []
    for i, name in enumerate(SETS):
        raw, folder = synth_set(workdir, name, images), prepared_set(workdir, name, images)
        manifest = data.load_manifest(folder)
        ours = sum(s["bytes"] for s in manifest["shards"])
        theirs = raw_bytes(raw)
        n_refs = sum(c["refs"] for c in manifest["splits"].values())
        n_images = sum(c["images"] for c in manifest["splits"].values())
        what = f"shard bytes, MB ({name} synth {DATASET}_{SPLIT_BY}: {n_images} images, {n_refs} refs, sentences + tokens + RLE inside)"
        rows.append(_row("shards", what, ours / 1e6, (theirs["jpeg"] + theirs["png"]) / 1e6, SHARDS_TARGET if i == 0 else None,
                         baseline_is=f"JPEG files {theirs['jpeg'] / 1e6:.1f} MB + 8-bit PNG mask per ref {theirs['png'] / 1e6:.1f} MB"))
    return rows


# ---------------------------------------------------------------------------------- eval

METRIC_CODE = (  # (module, function): the metric code of `refbench eval`, timed by wrapping
    ("refbench.evaluate", "count_iu"),  # map back to the original size, binarise, I and U per sentence
    ("refbench.metrics", "summarize"),  # mIoU, oIoU, Pr@X (record and its re-check on load)
    ("refbench.metrics", "bootstrap_ci"),  # 95% intervals
    ("refbench.metrics", "breakdowns"),  # by length, category, location words
)


@contextlib.contextmanager
def time_spent_in(functions: tuple[tuple[str, str], ...]) -> Iterator[list[float]]:
    """Wrap module functions (looked up as module attributes by their callers) to sum their wall time.

    Yields a one-element list holding the seconds spent so far (nested calls counted once);
    the originals are put back on exit.
    """
    import importlib

    spent, depth = [0.0], [0]

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.perf_counter() - t0

        return timed

    originals = []
    try:
        for module_name, attr in functions:
            module = importlib.import_module(module_name)
            originals.append((module, attr, getattr(module, attr)))
            setattr(module, attr, wrap(getattr(module, attr)))
        yield spent
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)


def tiny_checkpoint(path: Path, dataset_dir: Path) -> Path:
    """A random-init tiny EAVL checkpoint (seeded) for `dataset_dir`, in the format `refbench train` writes."""
    import dataclasses

    import torch

    from refbench import models
    from refbench import checkpoint, data
    from refbench.fsutil import sha256_file

    torch.manual_seed(SEED)
    net = models.build("eavl", "tiny", pretrained=None)
    manifest = data.load_manifest(dataset_dir)
    return checkpoint.save(path, {
        "model": {"name": net.model_name, "variant": net.variant, "config": dataclasses.asdict(net.config)},
        "state_dict": net.state_dict(), "optimizer": None, "scaler": None, "step": 0, "epoch": 0, "step_in_epoch": 0,
        "dataset": {"name": manifest["name"], "manifest_sha256": sha256_file(Path(dataset_dir) / "manifest.json"),
                    "context_length": manifest["tokenizer"]["context_length"]},
    })


def bench_eval(workdir: Path, images: int) -> list[dict]:
    """Share of `refbench eval` wall time in metric code (`METRIC_CODE`), tiny random-init EAVL, original protocol."""
    import shutil

    from refbench import evaluate

    name = next(iter(SETS))
    folder = prepared_set(workdir, name, images)
    ckpt = tiny_checkpoint(Path(workdir) / "eval-tiny-eavl.pt", folder)
    results = Path(workdir) / "eval-results"
    walls, metric = [], []
    for rep in range(EVAL_WARMUP + EVAL_REPS):
        shutil.rmtree(results, ignore_errors=True)
        with time_spent_in(METRIC_CODE) as spent, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            evaluate.main(checkpoint=ckpt, dataset=folder.name, split=EVAL_SPLIT, shards=folder.parent,
                          protocol="original", batch_size=16, workers=EVAL_WORKERS, vis=0, results=results, run_name="bench")
            wall = time.perf_counter() - t0
        if rep >= EVAL_WARMUP:
            walls.append(wall)
            metric.append(spent[0])
    shutil.rmtree(results, ignore_errors=True)
    sentences = json.loads((folder / "manifest.json").read_text())["splits"][EVAL_SPLIT]["sentences"]
    what = (f"eval metric code, s ({name} synth {folder.name} {EVAL_SPLIT}, {sentences} sentences, tiny EAVL random init, "
            f"protocol original, batch 16, {EVAL_WORKERS} loader workers, median of {EVAL_REPS})")
    return [_row("eval", what, statistics.median(metric), statistics.median(walls), EVAL_TARGET, _median_ratio(metric, walls),
                 baseline_is="wall time of evaluate.main (the `refbench eval` command after start-up)")]


# ---------------------------------------------------------------------------------- model


def _step_time(model, image, tokens, mask) -> float:
    """Seconds for one forward + loss + backward (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(image, tokens)
    model.loss(out, mask)["loss"].backward()
    return time.perf_counter() - start


def bench_model(workdir: Path, images: int) -> list[dict]:
    """EAVL vs CRIS: fwd+bwd step time on the same backbone, batch and inputs; parameter counts.

    Settings: `MODEL_SETTINGS`; `images` (the data benchmarks' size) does not apply here.
    """
    import torch

    from refbench import models

    rows = []
    warmup = MODEL_WARMUP
    for variant, batch, reps in MODEL_SETTINGS:
        torch.manual_seed(0)
        nets = {name: models.build(name, variant).train() for name in ("eavl", "cris")}
        size = nets["eavl"].image_size
        g = torch.Generator().manual_seed(0)
        image = torch.randn(batch, 3, size, size, generator=g)
        mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
        tokens = torch.zeros(batch, 17, dtype=torch.long)
        tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49400, (batch, 5), generator=g), 49407
        times: dict[str, list[float]] = {name: [] for name in nets}
        for rep in range(warmup + reps):
            for name, net in nets.items():  # interleaved: eavl, cris, eavl, cris, ...
                t = _step_time(net, image, tokens, mask)
                if rep >= warmup:
                    times[name].append(t)
        step = {name: statistics.median(ts) for name, ts in times.items()}
        # the ratio is the median of per-repetition ratios: each pair ran back to back, so load
        # from other processes that comes and goes cancels within a pair
        ratio = statistics.median(e / c for e, c in zip(times["eavl"], times["cris"]))
        params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
        setting = f"{variant}, {size}px, batch {batch}, L=17, median of {reps}"
        rows.append(_row("model", f"EAVL/CRIS fwd+bwd step, s ({setting})", step["eavl"], step["cris"], MODEL_STEP_TARGET, ratio,
                         baseline_is="CRIS, same backbone, batch and inputs"))
        rows.append(_row("model", f"EAVL/CRIS parameters, M ({variant})", params["eavl"] / 1e6, params["cris"] / 1e6, None,
                         baseline_is="CRIS"))
        del nets
    return rows


def bench_score(workdir: Path, images: int) -> list[dict]:
    """`refbench score` vs decoding the submitted masks (refbench/score_bench.py)."""
    from refbench.score_bench import bench_score as run

    return run(workdir, images)


def bench_gpu(workdir: Path, images: int) -> list[dict]:
    """The GPU rows (refbench/bench_gpu.py); one line and no rows without a CUDA device."""
    from refbench import bench_gpu as gpu

    return gpu.bench_gpu(workdir, images)


BENCHES: dict[str, Callable[[Path, int], list[dict]]] = {
    "prepare": bench_prepare,
    "loader": bench_loader,
    "shards": bench_shards,
    "model": bench_model,
    "eval": bench_eval,
    "score": bench_score,
    "gpu": bench_gpu,
}


# ---------------------------------------------------------------------------------- the command


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def _append_jsonl(log: Path, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten atomically (temp + rename)."""
    old = log.read_text() if log.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(log, old + json.dumps(record) + "\n")


def print_rows(rows: list[dict], caption: str | None = None) -> None:
    """The results as one rich table; each row says what was measured and what the baseline does."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title="refbench bench (ratio = ours / baseline)", caption=caption, show_lines=True)
    for col in ("bench", "what (unit, data, setting) / [dim]baseline[/]", "ours", "baseline", "ratio", "target", "ok"):
        table.add_column(col, justify="right" if col in ("ours", "baseline", "ratio") else "left")
    for r in rows:
        ok = "-" if r["ok"] is None else ("[green]yes[/]" if r["ok"] else "[red]NO[/]")
        what = r["what"] + (f"\n[dim]baseline: {r['baseline_is']}[/]" if r.get("baseline_is") else "")
        table.add_row(r["bench"], what, f"{r['ours']:.4g}", f"{r['baseline']:.4g}", f"{r['ratio']:.3f}", r["target"] or "-", ok)
    Console(width=None if sys.stdout.isatty() else 150).print(table)


def write_tables(rows: list[dict], out: Path, caption: str) -> tuple[Path, Path]:
    """The rows as out/bench.json (with the caption) and out/bench.md (one markdown table), atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{caption}", "", "| bench | what | ours | baseline | ratio | target | ok |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        what = r["what"] + (f" (baseline: {r['baseline_is']})" if r.get("baseline_is") else "")
        lines.append(f"| {r['bench']} | {what} | {r['ours']:.4g} | {r['baseline']:.4g} | {r['ratio']:.3f} | {r['target'] or '-'} | {ok} |")
    json_path, md_path = out / "bench.json", out / "bench.md"
    atomic_write_text(json_path, json.dumps({"caption": caption, "rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def main(which, workdir: Path, images: int, log: Path, out: Path | None = None) -> list[dict]:
    """Run the benchmarks named in `which` ("all" = every registered one), print, log (and write to `out`)."""
    names = list(BENCHES) if "all" in which else list(dict.fromkeys(which))
    missing = [n for n in names if n not in BENCHES]
    if missing:
        raise RefbenchError(
            f"unknown benchmark(s) {', '.join(missing)}: not implemented",
            hint=f"available: {', '.join(BENCHES)}",
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for name in names:
        rows.extend(BENCHES[name](workdir, images))
    import torch

    load = [round(x, 2) for x in os.getloadavg()]
    caption = (f"{platform.machine()}, {_cores()} cores, torch {torch.__version__}, load average {load_before[0]:.2f} before / "
               f"{load[0]:.2f} after (1 min): other processes share the cores; ratios pair back-to-back runs")
    if not rows:  # e.g. `bench gpu` without a GPU: it said so in one line
        return rows
    print_rows(rows, caption=caption)
    if out is not None:
        for path in write_tables(rows, out, caption):
            print(f"wrote {path}")
    _append_jsonl(
        Path(log),
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": _git_commit(),
            "machine": platform.machine(),
            "cores": _cores(),
            "load_average": load,
            "torch_threads": torch.get_num_threads(),
            "images": images,
            "benches": names,
            "rows": rows,
        },
    )
    return rows
