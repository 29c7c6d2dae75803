"""Shared test set-up: offline, few threads, deterministic."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# OpenMP threads spin briefly, then sleep, as under the `refbench` command (before torch loads)
from refbench.cli import bounded_openmp_spin  # noqa: E402 (no torch import)

bounded_openmp_spin()


# --------------------------------------------------------------------------------- data fixtures

SYNTH_IMAGES = 48  # small synthetic REFER set shared by the data tests (every split non-empty)
SYNTH_SHARD_SIZE = 8  # images per shard in `shards_root`, so train splits span several shards


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset in the raw REFER layout (`refbench synth`), written once per session.

    Read-only for tests: copy it (shutil.copytree) before corrupting anything.
    """
    from refbench.data.synth import generate as synth

    root = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(root, SYNTH_IMAGES, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory, synth_root):
    """`synth_root` prepared with all four dataset/partitions: <root>/<dataset>_<splitby>/..., read-only."""
    from refbench.data import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare.main(all_=True, data=synth_root, out=out, workers=2, shard_size=SYNTH_SHARD_SIZE)
    return out


SMALL_SHARD_SIZE = 2  # images per shard in `small_shards_root`: every split has >= 2 shards, one per rank of 2


@pytest.fixture(scope="session")
def small_shards_root(tmp_path_factory, synth_root):
    """`synth_root`'s refcoco prepared with 2 images per shard (<root>/refcoco_unc), read-only:
    enough shards in every split for 2-rank training and evaluation."""
    from refbench.data import prepare

    out = tmp_path_factory.mktemp("small_shards")
    prepare.main(dataset="refcoco", data=synth_root, out=out, workers=1, shard_size=SMALL_SHARD_SIZE)
    return out


TINY_RUN_STEPS = 8  # optimiser steps of `tiny_run` (batch 4): enough for the loss to fall clearly


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shards_root):
    """A tiny EAVL trained in-process for a few steps on `shards_root`'s refcoco_unc (batch 4,
    seed 0, loss logged every step): the run folder with last.pt, best.pt and log.jsonl. Read-only."""
    from _harness import torch_threads, train_config

    from refbench.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny-eavl"
    with torch_threads(1):
        return train(train_config(shards_root, out, steps=TINY_RUN_STEPS))


@pytest.fixture(scope="session")
def init_run(tmp_path_factory, shards_root):
    """A tiny EAVL checkpoint at its seeded init (one step at lr 0) on `shards_root`'s refcoco_unc:
    the run folder `tiny-eavl-init` with last.pt and best.pt. Unlike a few-step run, which predicts
    nothing yet, it predicts non-empty masks, so I, U and the metrics of an eval are all informative."""
    from _harness import torch_threads, train_config

    from refbench.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny-eavl-init"
    with torch_threads(1):
        return train(train_config(shards_root, out, steps=1, lr=0.0, min_lr=0.0))


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test (see tests/_harness.py: the machine is shared)."""
    from _harness import torch_threads

    with torch_threads(1):
        yield
