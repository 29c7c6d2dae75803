"""What every `refbench bench` benchmark shares: its settings, result rows, paired timing, data sets.

A row is a dict: bench, what (the quantity, with its unit, data set and setting), ours,
baseline, baseline_is (what the baseline does, in words), ratio (ours / baseline), target
(e.g. "<= 1.15", ">= 3.0", or None for information only) and ok.

Timings are medians over several interleaved repetitions after a warm-up: the two sides
alternate step by step, and a time ratio is the median of the per-repetition ratios, so a
noisy neighbour on the machine slows both sides of a pair alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console

from refbench.data import datasets, prepare
from refbench.data import shards as data
from refbench.data.synth import generate as synth
from refbench.data.synth.generate import SynthConfig
from refbench.errors import RefbenchError
from refbench.fsutil import sha256_file

MODEL_STEP_TARGET = 1.15  # EAVL fwd+bwd step time <= 1.15 x CRIS's
PREPARE_TARGET = 1.5  # prepare wall time <= 1.5 x the read-and-tar floor
LOADER_TARGET = 3.0  # train loader samples per CPU-second >= 3 x the refer-style loader's
SHARDS_TARGET = 1.1  # shard bytes <= 1.1 x raw JPEGs + PNG masks
EVAL_TARGET = 0.05  # metric code <= 5% of eval wall time


def default_sets() -> dict[str, SynthConfig]:
    """Synthetic data sets: name -> generator config. The first one is representative and carries the targets."""
    return {
        "coco-like": SynthConfig(width=(640, 640), height=(427, 480), noise_sigma=24.0),  # ~160 KB JPEGs, like COCO
        "default": SynthConfig(),  # the embedded quickstart data: ~250 x 200 px, ~15 KB JPEGs
    }


@dataclass(frozen=True)
class BenchSettings:
    """Everything a `refbench bench` run depends on; the defaults are the command's."""

    workdir: Path = Path("bench")  # scratch folder: synthetic sets, their shards, floor tars, checkpoints
    images: int = 2000  # synthetic images per data set
    log: Path = Path("bench/bench.jsonl")  # JSON-lines file one record per run is appended to
    seed: int = 0  # synth seed of the benchmark data (and of the random-init models)
    sets: dict[str, SynthConfig] = field(default_factory=default_sets)  # data sets; the first carries the targets
    dataset: str = "refcoco"  # the dataset whose partition the data benchmarks measure
    split_by: str = "unc"  # and its partition
    prepare_reps: int = 3  # prepare: timed repetitions per side
    prepare_warmup: int = 1  # prepare: untimed repetitions per side first (they also warm the page cache)
    loader_settings: tuple[tuple[int, int, int, int], ...] = ((480, 16, 4, 5),)  # loader: (input size, batch, batches per rep, timed reps)
    loader_warmup: int = 2  # loader: untimed batches per side first (fills our shuffle buffer, warms caches)
    eval_reps: int = 2  # eval: timed evaluation runs
    eval_warmup: int = 1  # eval: untimed runs first
    eval_split: str = "val"  # eval: the split scored
    eval_workers: int = 2  # eval: DataLoader workers of the eval loader (`refbench eval`'s default)
    model_settings: tuple[tuple[str, int, int], ...] = (("tiny", 32, 7), ("rn50", 2, 3))  # model: (variant, batch, timed reps)
    model_warmup: int = 2  # model: untimed steps per model before timing
    step_models: tuple[str, ...] = ("eavl", "cris", "blind")  # step: the models whose training step is profiled (the quickstart's)
    step_batch: int = 32  # step: training batch (the quickstart's)
    step_workers: int = 1  # step: DataLoader workers (the quickstart's)
    step_steps: int = 10  # step: timed steps, plain and again under the profiler
    step_warmup: int = 5  # step: untimed steps first


def row(bench: str, what: str, ours: float, baseline: float, target: float | None, ratio: float | None = None,
         *, at_least: bool = False, baseline_is: str | None = None) -> dict:
    """One result; `ratio` defaults to ours / baseline; the target is a ceiling, or a floor when `at_least`."""
    ratio = ours / baseline if ratio is None else ratio
    return {
        "bench": bench,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "baseline_is": baseline_is,
        "ratio": ratio,
        "target": None if target is None else f"{'>=' if at_least else '<='} {target}",
        "ok": None if target is None else (ratio >= target if at_least else ratio <= target),
    }


def interleaved(sides: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Call each side once per repetition, alternating which goes first; the timed results per side."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            value = sides[name]()
            if rep >= warmup:
                out[name].append(value)
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-repetition ratios a_i / b_i (each pair ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synth_set(s: BenchSettings, name: str) -> Path:
    """The raw REFER folder of benchmark set `name` (`s.images` images); generated unless already there."""
    cfg = s.sets[name]
    raw = Path(s.workdir) / f"synth-{name}-{s.images}"
    if synth.written_identity(raw) == synth.identity(s.images, s.seed, cfg) and synth.is_complete(raw):
        return raw
    synth.generate(raw, s.images, s.seed, cfg)
    return raw


def prepared_set(s: BenchSettings, name: str) -> Path:
    """`refbench prepare` output (the measured partition's folder) of benchmark set `name`; prepared unless already there."""
    raw = synth_set(s, name)
    out = Path(s.workdir) / f"shards-{name}-{s.images}"
    folder = out / datasets.dataset_name(s.dataset, s.split_by)
    refs_sha = sha256_file(raw / s.dataset / f"refs({s.split_by}).p")
    try:
        if data.load_manifest(folder)["sources"]["refs"]["sha256"] == refs_sha:
            return folder
    except RefbenchError:
        pass
    run_prepare(s, raw, out)
    return folder


def run_prepare(s: BenchSettings, raw: Path, out: Path) -> None:
    """What `refbench prepare --dataset D --split-by P` does, with its progress display silenced."""
    prepare.prepare_all([(s.dataset, s.split_by)], raw, raw / "images" / "train2014", out, cores(), False,
                        prepare.DEFAULT_SHARD_SIZE, console=Console(file=io.StringIO()))


@contextlib.contextmanager
def time_spent_in(functions: tuple[tuple[str, str], ...]) -> Iterator[list[float]]:
    """Wrap module functions (looked up as module attributes by their callers) to sum their wall time.

    Yields a one-element list holding the seconds spent so far (nested calls counted once);
    the originals are put back on exit.
    """
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
