"""The benchmarks of `refbench bench`: each `bench_x(settings) -> list[row]`, refbench's side beside a baseline.

- prepare: `prepare.prepare_all` (the work of `refbench prepare`: process pool start, planning,
  shard writing with `--workers` = the core count, commit) vs the floor (`baselines.write_floor`):
  the same JPEG files read and written into tars of the same images per shard on the same disk,
  fsynced like prepare's, by one Python process with `tarfile` (wall time; CPU time of all
  processes as information).
- loader: samples per CPU-second of `train_stream.train_loader` vs `baselines.ReferStyleDataset`, what
  CRIS/LAVT style datasets do per sample, both in the main process (no DataLoader workers), one
  torch thread.
- shards: bytes of the measured partition's shards vs the raw JPEGs plus one 8-bit PNG mask per ref.
- model: EAVL vs CRIS forward + backward step time.
- eval: share of `evaluate.evaluate_checkpoint` wall time spent in metric code (count_iu:
  mapping back, binarising, I/U; metrics.summarize, bootstrap_ci, breakdowns), for a
  random-init tiny EAVL.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from refbench import checkpoint, models
from refbench.bench.baselines import ReferStyleDataset, raw_bytes, shard_plan, write_floor
from refbench.bench.common import (
    EVAL_TARGET,
    LOADER_TARGET,
    MODEL_STEP_TARGET,
    PREPARE_TARGET,
    SHARDS_TARGET,
    BenchSettings,
    cores,
    cpu_seconds,
    interleaved,
    median_ratio,
    prepared_set,
    row,
    run_prepare,
    synth_set,
    time_spent_in,
)
from refbench.data import prepare
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.eval import evaluate

METRIC_CODE = (  # (module, function): the metric code of `refbench eval`, timed by wrapping
    ("refbench.eval.evaluate", "count_iu"),  # map back to the original size, binarise, I and U per sentence
    ("refbench.eval.metrics", "summarize"),  # mIoU, oIoU, Pr@X (record and its re-check on load)
    ("refbench.eval.metrics", "bootstrap_ci"),  # 95% intervals
    ("refbench.eval.metrics", "breakdowns"),  # by length, category, location words
)


def bench_prepare(s: BenchSettings) -> list[dict]:
    """`refbench prepare` wall time vs the read-and-tar floor, per benchmark set (see the module docstring)."""
    rows = []
    for i, name in enumerate(s.sets):
        raw = synth_set(s, name)
        plan = shard_plan(raw, s.dataset, s.split_by, prepare.DEFAULT_SHARD_SIZE)
        out_ours, out_floor = Path(s.workdir) / f"shards-{name}-{s.images}", Path(s.workdir) / f"floor-{name}-{s.images}"
        cpu: dict[str, list[float]] = {"ours": [], "floor": []}

        def timed(side: str, work: Callable[[], object]) -> float:
            c0, t0 = cpu_seconds(), time.perf_counter()
            work()
            wall = time.perf_counter() - t0
            cpu[side].append(cpu_seconds() - c0)
            return wall

        wall = interleaved({"ours": lambda: timed("ours", lambda: run_prepare(s, raw, out_ours)),
                             "floor": lambda: timed("floor", lambda: write_floor(plan, out_floor))},
                            s.prepare_reps, s.prepare_warmup)
        cpu = {k: v[s.prepare_warmup:] for k, v in cpu.items()}
        manifest = data.load_manifest(prepared_set(s, name))
        n = sum(e["samples"] for e in manifest["shards"])
        kb = sum((p.stat().st_size for _, members in plan for _, p in members)) / n / 1e3
        setting = f"{name} synth, {s.dataset}_{s.split_by}, {n} images, {kb:.0f} KB/JPEG, {cores()} workers, median of {s.prepare_reps}"
        floor_is = "read JPEG bytes + tarfile, same shards and disk, fsync, 1 process"
        target = PREPARE_TARGET if i == 0 else None  # the representative set carries the target
        rows.append(row("prepare", f"prepare wall, s ({setting})", statistics.median(wall["ours"]),
                         statistics.median(wall["floor"]), target, median_ratio(wall["ours"], wall["floor"]),
                         baseline_is=floor_is))
        rows.append(row("prepare", f"prepare CPU, s, all processes ({name} synth)", statistics.median(cpu["ours"]),
                         statistics.median(cpu["floor"]), None, median_ratio(cpu["ours"], cpu["floor"]),
                         baseline_is=floor_is))
    return rows


def _cycle(make: Callable[[], object]) -> Iterator[dict]:
    """Batches of `make()`'s iterable, restarted when it ends."""
    while True:
        yield from make()


def _samples_per_cpu_second(batches: Iterator[dict], n: int) -> float:
    c0, count = time.process_time(), 0
    for _ in range(n):
        count += len(next(batches)["sent_id"])
    return count / (time.process_time() - c0)


def bench_loader(s: BenchSettings) -> list[dict]:
    """Train loader samples per CPU-second vs `ReferStyleDataset` in a torch DataLoader (same batches, size, data)."""
    name = next(iter(s.sets))
    raw, folder = synth_set(s, name), prepared_set(s, name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core; DataLoader workers run one thread each too
    rows = []
    try:
        for size, batch, per_rep, reps in s.loader_settings:
            base = ReferStyleDataset(raw, s.dataset, s.split_by, "train", size)
            g = torch.Generator().manual_seed(s.seed)
            theirs = _cycle(lambda: torch.utils.data.DataLoader(base, batch_size=batch, shuffle=True, generator=g, num_workers=0))
            ours = iter(train_stream.train_loader(folder, batch_size=batch, image_size=size, num_batches=10**9, seed=s.seed, workers=0))
            for it in (ours, theirs):
                _samples_per_cpu_second(it, s.loader_warmup)
            rates = interleaved({"ours": lambda: _samples_per_cpu_second(ours, per_rep),
                                  "theirs": lambda: _samples_per_cpu_second(theirs, per_rep)}, reps, 0)
            del ours  # stops the stream
            setting = f"{name} synth {s.dataset}_{s.split_by} train, {size} px, batch {batch}, no workers, 1 thread, median of {reps}x{per_rep} batches"
            rows.append(row("loader", f"train_loader samples per CPU-s ({setting})", statistics.median(rates["ours"]),
                             statistics.median(rates["theirs"]), LOADER_TARGET,
                             median_ratio(rates["ours"], rates["theirs"]), at_least=True,
                             baseline_is="refer-style per ref: PIL full decode, pycocotools polygons, PIL letterbox, torchvision normalise"))
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_shards(s: BenchSettings) -> list[dict]:
    """Shard bytes vs raw JPEGs + one PNG mask per ref, per benchmark set."""
    rows = []
    for i, name in enumerate(s.sets):
        raw, folder = synth_set(s, name), prepared_set(s, name)
        manifest = data.load_manifest(folder)
        ours = sum(e["bytes"] for e in manifest["shards"])
        theirs = raw_bytes(raw, s.dataset, s.split_by)
        n_refs = sum(c["refs"] for c in manifest["splits"].values())
        n_images = sum(c["images"] for c in manifest["splits"].values())
        what = f"shard bytes, MB ({name} synth {s.dataset}_{s.split_by}: {n_images} images, {n_refs} refs, sentences + tokens + RLE inside)"
        rows.append(row("shards", what, ours / 1e6, (theirs["jpeg"] + theirs["png"]) / 1e6, SHARDS_TARGET if i == 0 else None,
                         baseline_is=f"JPEG files {theirs['jpeg'] / 1e6:.1f} MB + 8-bit PNG mask per ref {theirs['png'] / 1e6:.1f} MB"))
    return rows


def tiny_checkpoint(path: Path, dataset_dir: Path, seed: int) -> Path:
    """A random-init tiny EAVL checkpoint (seeded) for `dataset_dir`, in the format `refbench train` writes."""
    torch.manual_seed(seed)
    net = models.build("eavl", "tiny", pretrained=None)
    return checkpoint.save(path, checkpoint.make_payload(net, dataset_dir=dataset_dir, manifest=data.load_manifest(dataset_dir)))


def bench_eval(s: BenchSettings) -> list[dict]:
    """Share of `refbench eval` wall time in metric code (`METRIC_CODE`), tiny random-init EAVL, original protocol."""
    name = next(iter(s.sets))
    folder = prepared_set(s, name)
    ckpt = tiny_checkpoint(Path(s.workdir) / "eval-tiny-eavl.pt", folder, s.seed)
    results = Path(s.workdir) / "eval-results"
    walls, metric = [], []
    for rep in range(s.eval_warmup + s.eval_reps):
        shutil.rmtree(results, ignore_errors=True)
        with time_spent_in(METRIC_CODE) as spent:
            t0 = time.perf_counter()
            evaluate.evaluate_checkpoint(ckpt, dataset=folder.name, splits=[s.eval_split], shards=folder.parent,
                                         protocol="original", batch_size=16, workers=s.eval_workers, results=results,
                                         run_name="bench")
            wall = time.perf_counter() - t0
        if rep >= s.eval_warmup:
            walls.append(wall)
            metric.append(spent[0])
    shutil.rmtree(results, ignore_errors=True)
    sentences = data.load_manifest(folder)["splits"][s.eval_split]["sentences"]
    what = (f"eval metric code, s ({name} synth {folder.name} {s.eval_split}, {sentences} sentences, tiny EAVL random init, "
            f"protocol original, batch 16, {s.eval_workers} loader workers, median of {s.eval_reps})")
    return [row("eval", what, statistics.median(metric), statistics.median(walls), EVAL_TARGET, median_ratio(metric, walls),
                 baseline_is="wall time of evaluate.evaluate_checkpoint (the `refbench eval` command after start-up)")]


def _step_time(model, image, tokens, mask) -> float:
    """Seconds for one forward + loss + backward (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(image, tokens)
    model.loss(out, mask)["loss"].backward()
    return time.perf_counter() - start


def bench_model(s: BenchSettings) -> list[dict]:
    """EAVL vs CRIS: fwd+bwd step time on the same backbone, batch and inputs; parameter counts.

    Settings: `s.model_settings`; `s.images` (the data benchmarks' size) does not apply here.
    """
    rows = []
    warmup = s.model_warmup
    for variant, batch, reps in s.model_settings:
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
        rows.append(row("model", f"EAVL/CRIS fwd+bwd step, s ({setting})", step["eavl"], step["cris"], MODEL_STEP_TARGET, ratio,
                         baseline_is="CRIS, same backbone, batch and inputs"))
        rows.append(row("model", f"EAVL/CRIS parameters, M ({variant})", params["eavl"] / 1e6, params["cris"] / 1e6, None,
                         baseline_is="CRIS"))
        del nets
    return rows
