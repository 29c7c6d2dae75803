"""Training runs side by side: one spawned process per run, each scored as soon as it is trained.

The quickstart trains its models this way, and `refbench bench seeds` its (model, seed) runs.
A tiny training step is hundreds of small kernels that a second thread barely speeds up, so on
a few cores separate one-thread runs get through more steps than runs one after another on
all the cores (2 cores, 60 steps of each tiny model: 62.7 s one after another on two threads,
48.8 s side by side on one thread each).

    run_jobs(jobs, lanes, threads)   up to `lanes` processes at once, trainings (`threads` torch
                                     threads each) in job order; each finished run is scored
                                     (refbench.eval.evaluate.evaluate_checkpoint) in a process of its
                                     own before the next training starts, on the cores the runs
                                     still training leave free
    progress                         one live line per run while it trains (step, samples/s,
                                     ETA, from its log.jsonl): rich bars on a terminal, a plain
                                     line per run every `every` seconds otherwise (a log file, CI)
    failures                         the first failure stops the others (their last.pt stays: a
                                     re-run resumes them) and is raised as it was raised

The processes are spawned (not forked: the parent may hold threads) and are not daemons, so a
run with DataLoader workers can start them. `env` sets environment variables for the children
only, read when they import torch: `ISA_ENV` makes torch and oneDNN take another CPU kind's
kernels (refbench bench seeds --isa avx2), and each child reports the capability it ran with.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refbench.errors import RefbenchError

# --isa -> the environment that makes a process's torch and oneDNN use that instruction set
# (torch.backends.cpu.get_cpu_capability() reports it); "native" = whatever the CPU has
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


@dataclass(frozen=True)
class Job:
    """One training run to bring to an end (`train.ensure_trained`) and, optionally, score."""

    name: str  # the run's name on its progress line and in the results
    train: Any  # refbench.train.TrainConfig
    score: dict | None = None  # keyword arguments of evaluate.evaluate_checkpoint (all but the checkpoint); None = not scored


@dataclass
class JobResult:
    """What a job left: its best.pt, how it went, its records."""

    best: Path
    state: str  # the run's state before (train.RUN_STATES): "done" = reused
    reason: str  # what training said, in words
    seconds: float  # training (or reuse) wall time
    capability: str  # torch's CPU capability in the training process (AVX512, AVX2, ...)
    records: list = field(default_factory=list)  # evaluate.Evaluated, one per scored split
    eval_seconds: float | None = None


def side_by_side(runs: int, cpus: int, workers: int) -> tuple[int, int, int]:
    """How `runs` training runs share `cpus` cores: (processes at once, torch threads each,
    DataLoader workers each). All at once whenever there are two cores or more, each with an
    equal share of the cores; a run left with one thread loads its data in its own process (a
    worker process would compete for the same cores)."""
    if runs < 2 or cpus < 2:
        return 1, max(1, cpus), workers
    threads = max(1, cpus // runs)
    return runs, threads, workers if threads > 1 else 0


def _train_quietly(cfg) -> tuple[str, str, str, str]:
    """One side-by-side run, its messages kept: (state before, reason, best.pt, CPU capability)."""
    import torch

    from refbench.train.runs import ensure_trained

    said: list[str] = []
    state, best = ensure_trained(cfg, say=said.append)
    return state.state, "; ".join([*said, state.reason]), str(best), torch.backends.cpu.get_cpu_capability()


def _score(ckpt: str, kwargs: dict) -> list:
    from refbench.eval import evaluate

    return evaluate.evaluate_checkpoint(Path(ckpt), **kwargs)


def _run_in_child(conn, fn, args, threads: int) -> None:
    """A side-by-side process: fn(*args) on `threads` torch threads, and (its result, seconds) or
    its exception sent back through `conn`."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        outcome = ("ok", (fn(*args), time.perf_counter() - t0))
    except BaseException as e:  # the parent raises it
        outcome = ("error", e)
    try:
        conn.send(outcome)
    except Exception as e:  # a result or an exception that does not pickle
        conn.send(("error", RuntimeError(f"{outcome[1]!r} (could not be sent back: {e})")))
    conn.close()


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """os.environ with `env` set, for the processes started inside the block."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def logged_progress(run: Path) -> tuple[int, float]:
    """(last logged step, its samples/s) from a run's log.jsonl; (0, 0.0) before its first log line."""
    try:
        with open(Path(run) / "log.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0, 0.0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial first line of the tail, or a line being written
        if isinstance(record.get("step"), int) and "samples_per_s" in record:
            return record["step"], float(record["samples_per_s"])
    return 0, 0.0


def rate_and_eta(step: int, total: int, samples_per_s: float, batch: int) -> str:
    """`52.3 samples/s  ETA 4:35`: a run's speed and the time its remaining steps take at it."""
    eta = "-:--"
    if step >= total:
        eta = "0:00"
    elif samples_per_s > 0:
        left = round((total - step) * batch / samples_per_s)
        eta = f"{left // 60}:{left % 60:02d}"
    return f"{samples_per_s:.1f} samples/s  ETA {eta}"


def progress_line(name: str, step: int, total: int, samples_per_s: float, batch: int, width: int = 0) -> str:
    """`eavl  step 120/600 (20%)  52.3 samples/s  ETA 4:35`: one run's progress in words."""
    return (f"{name:<{width}}  step {step}/{total} ({100 * step // max(1, total)}%)  "
            f"{rate_and_eta(step, total, samples_per_s, batch)}")


class _Progress:
    """One live line per training run: rich bars on a terminal, plain lines every `every` s otherwise."""

    def __init__(self, console, jobs: list[Job], every: float) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.every, self.last_print = console, every, time.perf_counter()
        self.live = console.is_terminal
        self.width = max(len(j.name) for j in jobs)
        self.totals = {j.name: j.train.recipe.steps for j in jobs}
        self.batch = {j.name: j.train.recipe.batch_size for j in jobs}
        self.state: dict[str, tuple[int, float]] = {}
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                             auto_refresh=False, disable=not self.live)  # redrawn once a poll: the runs need the cores
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Progress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def started(self, name: str) -> None:
        self.tasks[name] = self.bars.add_task(name, total=self.totals[name], info="starting")
        self.state[name] = (0, 0.0)

    def training(self, name: str, run: Path) -> None:
        step, sps = logged_progress(run)
        self.state[name] = (step, sps)
        self.bars.update(self.tasks[name], completed=step, info=rate_and_eta(step, self.totals[name], sps, self.batch[name]))

    def status(self, name: str, words: str) -> None:
        """After training: `words` (scoring, scored) on the run's line, which no longer shows steps."""
        self.state.pop(name, None)
        self.bars.update(self.tasks[name], completed=self.totals[name], info=words)
        if not self.live:
            self.console.print(f"{name}: {words}")

    def tick(self) -> None:
        if self.live:
            self.bars.refresh()
        elif self.state and time.perf_counter() - self.last_print >= self.every:
            self.last_print = time.perf_counter()
            for name, (step, sps) in self.state.items():
                self.console.print(progress_line(name, step, self.totals[name], sps, self.batch[name], self.width))


def run_jobs(jobs: list[Job], *, lanes: int, threads: int, console, cores: int = 1, env: dict[str, str] | None = None,
             every: float = 30.0) -> dict[str, JobResult]:
    """Train every job and score each one (`Job.score`) once it is trained: at most `lanes`
    processes at a time, a trained run's scoring before the next training, each training on
    `threads` threads, each scoring on `threads` or, of the `cores`, all that the runs still
    training leave. `env`: environment variables of the child processes. Returns
    {job name: JobResult} in job order; the first failure stops the others and is raised."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    env = env or {}
    pending = list(jobs)
    by_name = {j.name: j for j in jobs}
    if len(by_name) != len(jobs):
        raise ValueError("side-by-side job names must be distinct")
    running: dict[tuple[str, str], tuple] = {}  # (kind, job name) -> (process, receiving end)
    scoring: list[tuple[str, str]] = []  # trained runs waiting for a lane to be scored: (job name, best.pt)
    done: dict[str, JobResult] = {}

    def start(kind: str, name: str, fn, args: tuple, n_threads: int) -> None:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_run_in_child, args=(send, fn, args, n_threads), name=f"{kind}-{name}")
        with _environment(env):
            proc.start()
        send.close()
        running[kind, name] = (proc, recv)

    def training() -> int:
        return sum(1 for kind, _ in running if kind == "train")

    try:
        with _Progress(console, jobs, every) as progress:
            while pending or scoring or running:
                while len(running) < lanes and (scoring or pending):  # a trained run's scoring first
                    if scoring:
                        name, path = scoring.pop(0)
                        progress.status(name, "scoring")
                        start("eval", name, _score, (path, by_name[name].score), max(threads, cores - threads * training()))
                    else:
                        job = pending.pop(0)
                        progress.started(job.name)
                        start("train", job.name, _train_quietly, (job.train,), threads)
                for (kind, name), (proc, recv) in list(running.items()):
                    if not recv.poll():
                        if kind == "train":
                            progress.training(name, by_name[name].train.out)
                        continue
                    try:
                        status, value = recv.recv()
                    except EOFError:  # it ended without a word: killed, or out of memory
                        proc.join()
                        raise RefbenchError(f"the {kind} process of {name} ended (exit code {proc.exitcode}) "
                                            "without a result") from None
                    proc.join()
                    del running[kind, name]
                    if status == "error":
                        raise value
                    result, took = value
                    job = by_name[name]
                    if kind == "train":
                        state, reason, path, capability = result
                        done[name] = JobResult(best=Path(path), state=state, reason=reason, seconds=round(took, 1),
                                               capability=capability)
                        console.print(f"{name}: {reason}" + (": reused" if state == "done" else f"; trained in {took:.0f} s"))
                        if job.score is not None:
                            scoring.append((name, path))
                            progress.status(name, "trained, to be scored")
                        else:
                            progress.status(name, "trained")
                    else:
                        done[name].records, done[name].eval_seconds = result, round(took, 1)
                        progress.status(name, "scored")
                progress.tick()
                if running:
                    time.sleep(1.0)
    finally:
        for proc, recv in running.values():  # after a failure, or an interrupt
            proc.terminate()
            proc.join()
            recv.close()
    return {j.name: done[j.name] for j in jobs}
