"""Helpers for the training, evaluation and fault tests: tiny training configs, `refbench` and
`torchrun` subprocesses, in-process CLI calls, and the one-line-error check.

Threads: the tests train on a shared 2-core machine. Two intra-op threads per process on an
oversubscribed machine slowed the tiny model's steps 5-40x in our measurements (threads spin
waiting for each other), so in-process training and every subprocess use one torch thread
(`torch_threads(1)`, OMP_NUM_THREADS=1); a 2-rank torchrun then uses exactly the two cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
DATASET = "refcoco_unc"  # the prepared dataset the tests train and score on


def tiny_recipe(steps: int, batch_size: int = 4, workers: int = 0, **changes):
    """The `tiny` recipe cut down for tests: `steps` optimiser steps, a short warm-up, every step logged."""
    from refbench.train.recipes import get_recipe

    rec = get_recipe("tiny", steps=steps, batch_size=batch_size, workers=workers)
    return dataclasses.replace(rec, warmup_steps=2, log_every=1, **changes)


def train_config(shards: Path, out: Path, model: str = "eavl", **kw):
    """A TrainConfig on `shards`/refcoco_unc, tiny variant, quiet; `kw` goes to tiny_recipe, except
    TrainConfig's own fields (resume, stop_after, seed, model_overrides)."""
    from refbench.train.config import TrainConfig

    own = {k: kw.pop(k) for k in ("resume", "stop_after", "seed", "model_overrides") if k in kw}
    shards = shards if "://" in str(shards) else Path(shards)  # a URL stays a string
    return TrainConfig(model=model, variant="tiny", dataset=DATASET, shards=shards, recipe=tiny_recipe(**kw),
                       out=Path(out), quiet=True, **own)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_log(run: Path) -> list[dict]:
    """The records of a run's log.jsonl, in order."""
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, tuple[float, float]]:
    """step -> (lr, loss) of a run's training log records."""
    return {r["step"]: (r["lr"], r["loss"]) for r in read_log(run) if "loss" in r}


# ------------------------------------------------------------------------------ subprocesses


def env() -> dict[str, str]:
    """The environment of a refbench subprocess: offline, one torch thread, this checkout first."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path, COLUMNS="200")


def refbench_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "refbench", *map(str, args)]


def refbench(*args: object, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m refbench ARGS` to the end; stdout and stderr captured as text."""
    return subprocess.run(refbench_cmd(*args), env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m refbench ARGS` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "refbench", *map(str, args)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_one_line_error(proc, *needles: str) -> str:
    """A refbench user error: exit status 2, stderr starts with `error: ` (then at most a `hint: `
    line), no traceback anywhere, and every needle in the error or hint line. Returns stderr.

    Blank lines before `error: ` are allowed: a rich progress display that a failure erases
    still ends with a newline in a non-terminal stream.

    `proc` is a CompletedProcess or a click.testing.Result (CliRunner).
    """
    returncode = getattr(proc, "returncode", getattr(proc, "exit_code", None))
    stdout, stderr = proc.stdout, proc.stderr
    assert returncode == 2, f"exit {returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    exception = getattr(proc, "exception", None)  # CliRunner: only the SystemExit of the error path
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "Traceback" not in stdout + stderr
    lines = stderr.lstrip("\n").splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


def cli(*args: object):
    """`refbench ARGS` in this process (click's CliRunner): the CLI path without a new interpreter."""
    from click.testing import CliRunner

    from refbench.cli import cli as group

    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def assert_cli_ok(result) -> None:
    if result.exit_code != 0:
        import traceback

        detail = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        raise AssertionError(f"exit {result.exit_code}\n{result.output[-3000:]}\n{detail}")
