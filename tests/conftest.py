"""Shared test set-up: offline, few threads, deterministic."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


# --------------------------------------------------------------------------------- data fixtures

SYNTH_IMAGES = 48  # small synthetic REFER set shared by the data tests (every split non-empty)
SYNTH_SHARD_SIZE = 8  # images per shard in `shards_root`, so train splits span several shards


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset in the raw REFER layout (`refbench synth`), written once per session.

    Read-only for tests: copy it (shutil.copytree) before corrupting anything.
    """
    from refbench import synth

    root = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(root, SYNTH_IMAGES, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory, synth_root):
    """`synth_root` prepared with all four dataset/partitions: <root>/<dataset>_<splitby>/..., read-only."""
    from refbench import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare.main(all_=True, data=synth_root, out=out, workers=2, shard_size=SYNTH_SHARD_SIZE)
    return out
