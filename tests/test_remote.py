"""Shards from a URL (refbench/remote.py): prepared shards served by a loopback HTTP server.

The server is the standard library's `http.server` on 127.0.0.1 with an ephemeral port, stopped
at the end of the module; nothing leaves the machine. It ignores Range headers (as many simple
servers do), so a resumed read re-reads and drops the bytes it had: the slowest honest case.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refbench import remote
from refbench.data import eval_stream
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.errors import RefbenchError
from refbench.eval import evaluate

DATASET = "refcoco_unc"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `server.break_after[path] = (n, times)` cuts that file after n bytes, `times` times."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def copyfile(self, source, outputfile) -> None:
        rule = self.server.break_after.get(self.path)
        if rule is None or rule[1] == 0:
            return super().copyfile(source, outputfile)
        n, times = rule
        self.server.break_after[self.path] = (n, times - 1)
        outputfile.write(source.read(n))
        outputfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)  # the connection dies mid-file


@pytest.fixture(scope="module")
def served(shards_root):
    """(base URL of `shards_root`, the server): http://127.0.0.1:<port>, stopped after the module."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(shards_root)))
    server.break_after = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)


def test_join_and_is_url():
    assert remote.is_url("http://h/x") and remote.is_url("s3://bucket/shards") and not remote.is_url("shards")
    assert remote.join("http://h/root/", "refcoco_unc", "manifest.json") == "http://h/root/refcoco_unc/manifest.json"
    assert remote.join(Path("root"), "a", "b") == Path("root/a/b")


def test_manifest_and_shards_from_the_url_are_the_folders(served, shards_root):
    url, _ = served
    folder = data.load_manifest(shards_root / DATASET)
    assert data.load_manifest(f"{url}/{DATASET}") == folder
    assert remote.sha256(f"{url}/{DATASET}/manifest.json") == remote.sha256(shards_root / DATASET / "manifest.json")
    assert data.verify_shards(folder, f"{url}/{DATASET}", "val") == data.verify_shards(folder, shards_root / DATASET, "val")


def test_eval_from_the_url_gives_the_folders_per_sentence_iu(served, shards_root):
    from refbench import models

    url, _ = served
    torch.manual_seed(0)
    net = models.build("eavl", "tiny")
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    manifest = data.load_manifest(shards_root / DATASET)
    local = evaluate.score_split(net, shards_root / DATASET, manifest, "val", d, batch_size=8, workers=0)
    over_http = evaluate.score_split(net, f"{url}/{DATASET}", manifest, "val", d, batch_size=8, workers=2)
    assert len(local) == manifest["splits"]["val"]["sentences"] > 0
    key = lambda cols: sorted(zip(cols["sent_id"], cols["I"], cols["U"]))  # noqa: E731 - workers reorder
    assert key(over_http.columns) == key(local.columns)
    assert sum(local.columns["U"]) > 0


def test_training_reads_its_steps_from_the_url(served, shards_root, tmp_path):
    from _harness import read_log, torch_threads, train_config, train_losses

    from refbench.train.loop import train

    url, _ = served
    kw = dict(batch_size=4, image_size=32, num_batches=3, seed=3)
    local = [b["sent_id"].tolist() for b in train_stream.train_loader(shards_root / DATASET, **kw)]
    over_http = [b["sent_id"].tolist() for b in train_stream.train_loader(f"{url}/{DATASET}", **kw)]
    assert over_http == local and len(local) == 3
    with torch_threads(1):
        run = train(train_config(url, tmp_path / "run", model="blind", steps=2))
    assert sorted(train_losses(run)) == [1, 2]  # both steps trained, from batches streamed over HTTP
    end = [e for e in read_log(run) if e.get("event") == "end"][-1]
    pieces = end["train_pieces"][0]  # (shard, first sample, end sample) read by rank 0
    assert pieces and all(str(p[0]).startswith(f"{url}/{DATASET}/train/") for p in pieces)
    assert (run / "last.pt").is_file()


def test_a_broken_connection_resumes_where_it_stopped(served, shards_root):
    url, server = served
    manifest = data.load_manifest(shards_root / DATASET)
    shard = data.split_shards(manifest, "", "val")[0]["path"]
    server.break_after[f"/{DATASET}/{shard}"] = (3000, 2)  # dies twice at byte 3000, then serves
    over_http = list(data.split_samples(manifest, f"{url}/{DATASET}", "val"))
    local = list(data.split_samples(manifest, shards_root / DATASET, "val"))
    assert [s["__key__"] for s in over_http] == [s["__key__"] for s in local]
    assert all(a["jpg"] == b["jpg"] and a["json"] == b["json"] for a, b in zip(over_http, local))
    assert server.break_after[f"/{DATASET}/{shard}"][1] == 0


def test_a_connection_that_keeps_breaking_names_the_shard_url(served, shards_root):
    url, server = served
    manifest = data.load_manifest(shards_root / DATASET)
    shard = data.split_shards(manifest, "", "val")[0]["path"]
    server.break_after[f"/{DATASET}/{shard}"] = (3000, remote.RETRIES + 1)
    try:
        with pytest.raises(RefbenchError) as err:
            list(eval_stream.eval_loader(f"{url}/{DATASET}", manifest, split="val", image_size=32, batch_size=4))
    finally:
        server.break_after.clear()
    assert f"{url}/{DATASET}/{shard}" in err.value.message and "connection broke" in err.value.message


def test_missing_dataset_and_dead_server_are_one_clear_line(served):
    url, _ = served
    with pytest.raises(RefbenchError, match="not found"):
        data.load_manifest(f"{url}/nowhere/{DATASET}")
    with pytest.raises(RefbenchError, match="127.0.0.1:9"):
        data.load_manifest(f"http://127.0.0.1:9/{DATASET}")  # the discard port: nothing listens


def test_sentences_and_score_read_the_ground_truth_from_the_url(served, shards_root):
    from refbench.eval import score

    url, _ = served
    local = score.ground_truth(shards_root / DATASET, split="val")
    over_http = score.ground_truth(f"{url}/{DATASET}", split="val")
    assert over_http.sent_id == local.sent_id and over_http.rle == local.rle and len(local) > 0
