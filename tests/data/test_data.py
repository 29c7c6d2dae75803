"""The webdataset loaders: train stream (shapes, determinism, resume, ranks), eval (every
sentence exactly once, GT masks, order) and corrupt shards, on a tiny hand-written dataset
(tests/_tiny_shards.py) and, when available, on the prepared synthetic datasets."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_shards import write_tiny_dataset

from refbench.data import eval_stream
from refbench.data import shards as data
from refbench.data import train_stream, transforms
from refbench.errors import RefbenchError
from refbench.fsutil import sha256_file

EOT = 49407
SIZE = 64  # input side for the tiny dataset (its images are 33..90 px)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dataset folder, ground truth): train 7 images / 4 shards, val 5 images / 3 shards."""
    return write_tiny_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A private copy of the tiny dataset that a test may corrupt."""
    ds, truth = tiny
    dst = tmp_path / ds.name
    shutil.copytree(ds, dst)
    return dst, truth


def _sentences(ds: Path, split: str) -> dict[int, dict]:
    """sent_id -> {"tokens", "ref_id"} read straight from the shards' JSON."""
    import tarfile

    out = {}
    for tar_path in sorted((ds / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    for ref in meta["refs"]:
                        for s in ref["sentences"]:
                            out[s["sent_id"]] = {"tokens": s["tokens"], "ref_id": ref["ref_id"]}
    return out


def _batches(loader) -> list[dict]:
    return list(loader)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# --------------------------------------------------------------------------------- train


def test_train_batches_are_well_formed_and_match_the_shards(tiny):
    ds, truth = tiny
    sents = _sentences(ds, "train")
    loader = train_stream.train_loader(ds, batch_size=3, image_size=SIZE, seed=1)
    n_refs = len(truth.refs["train"])
    assert len(loader) == loader.steps_per_epoch == -(-n_refs // 3)
    batches = _batches(loader)
    assert len(batches) == len(loader)
    for b in batches:
        assert b["image"].shape == (3, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8
        assert b["content"].shape == (3, 4) and b["content"].dtype == torch.int64
        assert b["tokens"].shape == (3, 17) and b["tokens"].dtype == torch.int64
        assert b["mask"].shape == (3, 1, SIZE, SIZE) and b["mask"].dtype == torch.uint8
        assert set(b["mask"].unique().tolist()) <= {0, 1}
        ready = data.to_device(b, "cpu")  # what the model gets: float image and mask
        assert ready["image"].dtype == torch.float32 and ready["mask"].dtype == torch.float32
        assert torch.equal(ready["mask"], b["mask"].float())
        assert torch.all(b["mask"].flatten(1).sum(1) > 0)
        assert torch.all((b["tokens"] == EOT).sum(1) == 1)
        assert torch.equal(b["tokens"].argmax(1), (b["tokens"] == EOT).int().argmax(1))
        for i in range(3):
            sent, ref_id = int(b["sent_id"][i]), int(b["ref_id"][i])
            assert sents[sent]["ref_id"] == ref_id  # the sentence belongs to the ref
            assert b["tokens"][i].tolist() == sents[sent]["tokens"]
            box = transforms.Letterbox.fit(truth.masks[ref_id].shape[1], truth.masks[ref_id].shape[0], SIZE)
            expected = transforms.mask_to_tensor(truth.masks[ref_id], box)
            assert torch.equal(ready["mask"][i], expected)  # the mask is the ref's, letterboxed
            assert b["content"][i].tolist() == [box.pad_y, box.pad_x, box.new_h, box.new_w]
            pad = torch.ones(SIZE, SIZE, dtype=torch.bool)
            pad[box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w] = False
            assert torch.all(ready["image"][i][:, pad] == 0)  # letterbox padding reads 0 after normalisation
            assert torch.all(b["image"][i][:, pad] == 0)


def test_train_stream_draws_sentences_at_random(tiny):
    """Over several epochs every sentence of a multi-sentence ref gets drawn."""
    ds, truth = tiny
    sents = _sentences(ds, "train")
    seen = set()
    for epoch in range(6):
        for b in train_stream.train_loader(ds, batch_size=4, image_size=32, epoch=epoch):
            seen.update(b["sent_id"].tolist())
    assert len(seen) >= 0.8 * len(sents)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_deterministic_for_a_seed(tiny, workers):
    ds, _ = tiny
    kw = dict(batch_size=2, image_size=SIZE, workers=workers)
    a = _batches(train_stream.train_loader(ds, seed=7, **kw))
    b = _batches(train_stream.train_loader(ds, seed=7, **kw))
    _assert_same_batches(a, b)
    other_seed = _batches(train_stream.train_loader(ds, seed=8, **kw))
    other_epoch = _batches(train_stream.train_loader(ds, seed=7, epoch=1, **kw))
    ids = [x["sent_id"].tolist() for x in a]
    assert ids != [x["sent_id"].tolist() for x in other_seed]
    assert ids != [x["sent_id"].tolist() for x in other_epoch]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_resume_skips_to_the_same_batches(tiny, workers):
    ds, _ = tiny
    kw = dict(batch_size=2, image_size=SIZE, workers=workers, seed=3, epoch=2)
    full = _batches(train_stream.train_loader(ds, **kw))
    for k in (1, 5, len(full)):
        resumed = train_stream.train_loader(ds, skip_batches=k, **kw)
        assert len(resumed) == len(full) - k
        _assert_same_batches(_batches(resumed), full[k:])


def test_train_loader_workers_live_across_epochs(tiny):
    """One TrainLoader for a run: its worker processes serve every epoch (forked once), each
    epoch's batches equal a fresh loader's of that epoch (so the order still changes every
    epoch), and a resumed epoch skips to the same batches."""
    ds, _ = tiny
    kw = dict(batch_size=2, image_size=SIZE, workers=2, seed=3)
    fresh = [_batches(train_stream.train_loader(ds, epoch=e, **kw)) for e in range(3)]
    assert [b["sent_id"].tolist() for b in fresh[0]] != [b["sent_id"].tolist() for b in fresh[1]]
    with train_stream.TrainLoader(ds, **kw) as run:
        pids = []
        for e in range(3):
            _assert_same_batches(_batches(run.epoch(e)), fresh[e])
            pids.append(_worker_pids(run))
        resumed = run.epoch(1, skip_batches=3)
        assert len(resumed) == len(fresh[1]) - 3
        _assert_same_batches(_batches(resumed), fresh[1][3:])
        _assert_same_batches(_batches(run.epoch(2)), fresh[2])
        assert pids[0] == pids[1] == pids[2] == _worker_pids(run) and len(pids[0]) == 2
        processes = list(run.dataloader._iterator._workers)
    assert all(not p.is_alive() for p in processes)  # closed with the block


def test_train_ranks_run_the_same_number_of_steps(tiny):
    ds, truth = tiny
    n_refs = len(truth.refs["train"])
    streams = [_batches(train_stream.train_loader(ds, batch_size=2, image_size=32, rank=r, world=2)) for r in (0, 1)]
    assert len(streams[0]) == len(streams[1]) == -(-n_refs // 4)  # ceil(refs / global batch of 4)
    assert [b["sent_id"].tolist() for b in streams[0]] != [b["sent_id"].tolist() for b in streams[1]]


def test_train_takes_num_batches_and_more_workers_than_shards(tmp_path):
    ds, _ = write_tiny_dataset(tmp_path, images={"train": 2}, shard_size=2)  # one shard
    loader = train_stream.train_loader(ds, batch_size=2, image_size=32, workers=2, num_batches=5)
    assert len(loader) == 5 and len(_batches(loader)) == 5
    with pytest.raises(ValueError):
        train_stream.train_loader(ds, batch_size=2, num_batches=5, skip_batches=6)


def test_epoch_plan_gives_every_image_to_exactly_one_stream():
    """RefCOCO's train split at 2 nodes x 8 GPUs x 8 workers: 34 shards of 500 images (the last
    shorter) cut into 128 parts that tile the split, sizes within one image; another epoch cuts
    elsewhere."""
    entries = [{"url": f"train-{i:06d}.tar", "samples": 500 if i < 33 else 494} for i in range(34)]
    total = sum(e["samples"] for e in entries)
    plans = [train_stream.epoch_plan(entries, seed=0, epoch=e, world=16, workers=8) for e in (0, 1)]
    for plan in plans:
        assert len(plan) == 16 and all(len(rank) == 8 for rank in plan)
        images = [(url, i) for rank in plan for part in rank for url, a, b in part for i in range(a, b)]
        assert len(images) == len(set(images)) == total  # every image once
        sizes = [sum(b - a for _, a, b in part) for rank in plan for part in rank]
        assert max(sizes) - min(sizes) <= 1
    assert plans[0] != plans[1]
    assert train_stream.epoch_plan(entries, seed=0, epoch=0, world=16, workers=8) == plans[0]  # a pure function


def _one_epoch_ref_ids(ds: Path, world: int, workers: int, batch_size: int, monkeypatch) -> list[int]:
    """The ref ids of one epoch of every rank's train stream, each DataLoader worker's share
    played in this process (its batches are g = w, w + workers, ...)."""
    ids = []
    for rank in range(world):
        loader = train_stream.train_loader(ds, batch_size=batch_size, image_size=32, rank=rank, world=world, workers=workers)
        stream = loader.dataloader.dataset
        for w in range(max(1, workers)):
            monkeypatch.setattr(train_stream, "_worker", lambda w=w: (w, max(1, workers)))
            batches = len(range(w, loader.steps_per_epoch, max(1, workers)))
            it = iter(stream)
            for _ in range(batches):
                batch = next(it)
                ids += batch["ref_id"].tolist()
    return ids


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (4, 3)])
def test_an_epoch_of_steps_reads_nearly_every_train_ref(tmp_path, world, workers, monkeypatch):
    """Coverage: over one epoch's steps, at any world size and worker count, the streams together
    emit almost every train ref (the rest only where a stream's part holds more refs than its
    steps take; a later epoch's plan cuts elsewhere). Drawing whole shards with replacement, each
    read from its first sample (the loader before the epoch plan), emitted 54%, 63% and 69% here."""
    ds, truth = write_tiny_dataset(tmp_path, images={"train": 40, "val": 2}, shard_size=10)
    refs = set(truth.refs["train"])
    ids = _one_epoch_ref_ids(ds, world, workers, batch_size=2, monkeypatch=monkeypatch)
    seen = set(ids) & refs
    assert set(ids) <= refs
    assert len(seen) / len(refs) >= 0.9, (len(seen), len(refs))


# --------------------------------------------------------------------------------- eval


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 5 workers on a 2-core machine
@pytest.mark.parametrize("workers", [0, 2, 5])
def test_eval_yields_every_sentence_exactly_once(tiny, workers):
    ds, truth = tiny
    loader = eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=4, workers=workers)
    assert loader.workers == workers  # 5 workers on 3 val shards: each its own run of sentences
    batches = _batches(loader)
    assert len(batches) == len(loader)
    ids = [i for b in batches for i in b["sent_id"]]
    assert len(ids) == len(set(ids)) == loader.sentences
    assert set(ids) == set(truth.sentences["val"])


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_ranks_together_cover_every_sentence_once(tiny, workers):
    ds, truth = tiny
    ids = []
    for rank in (0, 1):
        loader = eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, workers=workers, rank=rank, world=2)
        got = [i for b in _batches(loader) for i in b["sent_id"]]
        assert len(got) == loader.sentences
        ids += got
    assert sorted(ids) == sorted(truth.sentences["val"])


def test_eval_rank_without_sentences_yields_nothing(tiny):
    ds, truth = tiny
    n = len(truth.sentences["val"])
    loaders = [eval_stream.eval_loader(ds, split="val", rank=r, world=n + 1, workers=2) for r in range(n + 1)]  # more ranks than sentences
    empty = [loader for loader in loaders if loader.sentences == 0]
    assert len(empty) == 1 and len(empty[0]) == 0 and empty[0].workers == 0 and _batches(empty[0]) == []
    assert sorted(loader.sentences for loader in loaders) == [0] + [1] * n


def test_eval_plan_cuts_below_shard_granularity():
    """RefCOCO val at 2 nodes x 8 GPUs x 8 workers: 3 shards of 3,811 sentences in all cut into
    128 parts that tile the split in file order, sizes within one sentence, none empty; a rank
    with fewer sentences than workers gets one part per sentence."""
    entries = [{"url": f"val-{i:06d}.tar", "sentences": n} for i, n in enumerate((1500, 1500, 811))]
    plan = eval_stream.eval_plan(entries, world=16, workers=8)
    assert len(plan) == 16 and all(len(rank) == 8 for rank in plan)
    order = [(url, i) for rank in plan for part in rank for url, a, b in part for i in range(a, b)]
    assert order == [(e["url"], i) for e in entries for i in range(e["sentences"])]  # each once, in file order
    sizes = [sum(b - a for _, a, b in part) for rank in plan for part in rank]
    assert min(sizes) > 0 and max(sizes) - min(sizes) <= 1
    assert eval_stream.eval_plan(entries, world=16, workers=8) == plan  # a pure function
    small = eval_stream.eval_plan([{"url": "v.tar", "sentences": 5}], world=2, workers=4)
    assert [len(r) for r in small] == [2, 3] and small[1] == [[("v.tar", 2, 3)], [("v.tar", 3, 4)], [("v.tar", 4, 5)]]


def _items_by_sentence(batches: list[dict]) -> dict[int, dict]:
    """sent_id -> that sentence's item (tensors and list fields) taken out of the batches."""
    out = {}
    for b in batches:
        for i, sid in enumerate(b["sent_id"]):
            item = {k: b[k][i] for k in (*eval_stream.EVAL_LISTS, "image", "content", "tokens")}
            assert sid not in out, f"sentence {sid} yielded twice"
            out[sid] = item
    return out


def _assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (1, 3)])
def test_eval_of_a_one_shard_split_gives_every_stream_a_share(tmp_path, world, workers):
    """A split of ONE shard read by more streams than shards: every rank and worker scores
    sentences, each sentence once, and each item equals the single-process loader's."""
    ds, truth = write_tiny_dataset(tmp_path, images={"train": 2, "val": 5}, shard_size=5)  # val: one shard
    assert data.load_manifest(ds)["splits"]["val"]["shards"] == 1
    single = _items_by_sentence(_batches(eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3)))
    assert list(single) == truth.sentences["val"]
    got = {}
    for rank in range(world):
        loader = eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, workers=workers, rank=rank, world=world)
        assert loader.workers == workers and loader.shards == [str(ds / "val" / "val-000000.tar")]
        parts = eval_stream.eval_plan(data.split_shards(data.load_manifest(ds), ds, "val"), world=world, workers=workers)[rank]
        assert len(parts) == max(1, workers) and all(sum(b - a for _, a, b in p) > 0 for p in parts)  # every stream works
        items = _items_by_sentence(_batches(loader))
        assert len(items) == loader.sentences > 0
        assert not items.keys() & got.keys()
        got.update(items)
    assert sorted(got) == sorted(single)
    for sid, item in single.items():
        _assert_same_items(got[sid], item)


def test_eval_one_shard_split_is_checked_by_the_stream_that_ends_it(tmp_path):
    """The shard's sha256 is checked by the stream holding its last sentence (the others stop
    reading at the end of their part): a flipped byte that decodes silently is still caught."""
    ds, truth = write_tiny_dataset(tmp_path, images={"train": 2, "val": 5}, shard_size=5)
    shard = ds / "val" / "val-000000.tar"
    _flip(shard, _silent_jpeg_flip(shard))
    first = eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, rank=0, world=2)
    assert len({i for b in _batches(first) for i in b["sent_id"]}) == first.sentences  # stops before the end
    with pytest.raises(RefbenchError, match="sha256"):
        _batches(eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, rank=1, world=2))


def test_eval_checks_the_sentence_count_of_each_shard(tiny_copy):
    ds, _ = tiny_copy
    manifest = json.loads((ds / "manifest.json").read_text())
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    val[0]["sentences"] += 1
    manifest["splits"]["val"]["sentences"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RefbenchError, match=f"{val[0]['path']} is corrupt: it holds {val[0]['sentences'] - 1} sentences"):
        _batches(eval_stream.eval_loader(ds, split="val", image_size=32))


def _worker_pids(loader) -> list[int]:
    """The process ids of a loader's DataLoader workers (torch keeps them on its live iterator)."""
    return [w.pid for w in loader.dataloader._iterator._workers]


def test_eval_loader_persistent_workers_serve_every_iteration(tiny):
    ds, _ = tiny
    workers = 2
    fresh = _batches(eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, workers=workers))
    loader = eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=3, workers=workers, persistent=True)
    first = _batches(loader)
    pids = _worker_pids(loader)
    second = _batches(loader)
    assert _worker_pids(loader) == pids and len(pids) == workers  # the same processes, not forked again
    for batches in (first, second):
        assert [b["sent_id"] for b in batches] == [b["sent_id"] for b in fresh]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, fresh))
    processes = list(loader.dataloader._iterator._workers)
    loader.close()
    assert all(not p.is_alive() for p in processes)


def test_eval_items_carry_what_scoring_needs(tiny):
    ds, truth = tiny
    sents = _sentences(ds, "val")
    batches = _batches(eval_stream.eval_loader(ds, split="val", image_size=SIZE, batch_size=5))
    first_image = {}
    for b in batches:
        n = len(b["sent_id"])
        assert b["image"].shape == (n, 3, SIZE, SIZE) and b["tokens"].shape == (n, 17)
        assert all(len(b[k]) == n for k in eval_stream.EVAL_LISTS)
        for i in range(n):
            sid, rid = b["sent_id"][i], b["ref_id"][i]
            assert sents[sid]["ref_id"] == rid and b["tokens"][i].tolist() == sents[sid]["tokens"]
            gt, box = b["gt_mask"][i], b["letterbox"][i]
            assert gt.dtype == torch.uint8 and gt.shape == (b["height"][i], b["width"][i])
            assert np.array_equal(gt.numpy(), truth.masks[rid])  # the RLE decodes to the drawn mask
            assert (box.orig_w, box.orig_h, box.size) == (b["width"][i], b["height"][i], SIZE)
            expected, _ = transforms.decode_image(truth.jpeg[b["image_id"][i]], SIZE)
            assert torch.equal(b["image"][i], transforms.letterbox_uint8(expected, box))
            assert b["content"][i].tolist() == list(transforms.content_box(box))
            assert torch.equal(b["gt"][i, : gt.shape[0], : gt.shape[1]], gt) and not b["gt"][i, gt.shape[0]:].any()
            normalised = data.to_device(b, "cpu")["image"][i]  # on the device: exactly `normalize`, to float32 rounding
            assert torch.allclose(normalised, transforms.normalize(expected, box), atol=1e-5)
            first_image.setdefault(b["image_id"][i], b["image"][i])
            assert torch.equal(first_image[b["image_id"][i]], b["image"][i])


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_order_is_deterministic(tiny, workers):
    ds, truth = tiny
    runs = [[b["sent_id"] for b in eval_stream.eval_loader(ds, split="val", batch_size=4, image_size=32, workers=workers)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    if workers == 0:  # one stream: the file order of the shards
        assert [i for b in runs[0] for i in b] == truth.sentences["val"]


# --------------------------------------------------------------------------------- bad input


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def _members(path: Path) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, data size) of each member of a tar, in order."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def _silent_jpeg_flip(shard: Path) -> int:
    """An offset inside the first JPEG where a flipped byte still decodes without error in PIL."""
    import io

    from PIL import Image

    _, _, start, size = _members(shard)[0]
    raw = bytearray(shard.read_bytes())
    for offset in range(start + 300, start + size - 2, 7):
        raw[offset] ^= 0x5A
        jpg = bytes(raw[start : start + size])
        raw[offset] ^= 0x5A
        try:
            Image.open(io.BytesIO(jpg)).load()
            return offset
        except Exception:
            continue
    raise AssertionError("no silently decodable flip found")


def _damage(shard: Path, how: str) -> None:
    members = _members(shard)  # [jpg 1, json 1, jpg 2, json 2]
    jpg, js, second_sample = members[0][2], members[1][2], members[2][1]
    {
        "truncated mid-member": lambda: _truncate(shard, jpg + 100),
        "truncated between samples": lambda: _truncate(shard, second_sample),  # tarfile alone sees a clean end
        "flipped byte in a header": lambda: _flip(shard, second_sample + 10),  # tarfile alone stops silently
        "flipped byte in the JPEG": lambda: _flip(shard, _silent_jpeg_flip(shard)),  # PIL alone decodes it
        "flipped byte in the JSON": lambda: _flip(shard, js + 5),
    }[how]()


DAMAGE = ["truncated mid-member", "truncated between samples", "flipped byte in a header",
          "flipped byte in the JPEG", "flipped byte in the JSON"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_raises_naming_the_shard_in_eval(tiny_copy, how, workers):
    ds, _ = tiny_copy
    shard = ds / "val" / "val-000001.tar"
    _damage(shard, how)
    with pytest.raises(RefbenchError) as e:
        _batches(eval_stream.eval_loader(ds, split="val", image_size=32, batch_size=4, workers=workers))
    assert str(shard) in e.value.message and "\n" not in e.value.message
    assert multiprocessing.active_children() == []  # the workers were stopped, not left hanging
    with pytest.raises(RefbenchError, match="val-000001.tar"):
        data.verify_shards(data.load_manifest(ds), ds, "val")


@pytest.mark.parametrize("how", ["truncated mid-member", "flipped byte in the JPEG"])
def test_corrupt_shard_raises_naming_the_shard_in_train(tiny_copy, how):
    ds, _ = tiny_copy
    shard = ds / "train" / "train-000000.tar"
    _damage(shard, how)
    with pytest.raises(RefbenchError) as e:  # resampled: read all shards over enough batches
        _batches(train_stream.train_loader(ds, batch_size=2, image_size=32, workers=2, num_batches=200))
    assert str(shard) in e.value.message and "\n" not in e.value.message


def test_sample_count_is_checked_without_sha256(tiny_copy):
    ds, _ = tiny_copy
    shard = ds / "val" / "val-000000.tar"
    _damage(shard, "truncated between samples")
    with pytest.raises(RefbenchError, match="val-000000.tar is corrupt: it holds 1 samples, the manifest says 2"):
        _batches(eval_stream.eval_loader(ds, split="val", image_size=32, verify=False))


def _rewrite_sample(ds: Path, shard_rel: str, edit) -> Path:
    """Rewrite one shard with `edit(name, bytes) -> bytes` applied, and re-sign it in the manifest
    (a consistent but wrong shard, as a buggy writer would make)."""
    import io
    import tarfile

    path = ds / shard_rel
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, edit(m.name, tar.extractfile(m).read())))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = json.loads((ds / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["path"] == shard_rel:
            s["sha256"], s["bytes"] = sha256_file(path), path.stat().st_size
    (ds / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    "what,edit,message",
    [
        ("bad JPEG", lambda n, b: b[:200] if n.endswith(".jpg") else b, "JPEG does not decode"),
        ("bad JSON", lambda n, b: b[:-3] if n.endswith(".json") else b, "bad JSON"),
        ("JSON without refs", lambda n, b: json.dumps({**json.loads(b), "refs": None}).encode() if n.endswith(".json") else b, "bad JSON"),
        ("short tokens", lambda n, b: b.replace(b', 0, 0]', b']') if n.endswith(".json") else b, "tokens"),
        ("bad RLE", lambda n, b: b.replace(b'"counts": "', b'"counts": "\\u0001') if n.endswith(".json") else b, "bad RLE"),
    ],
)
def test_bad_sample_in_a_consistent_shard_names_shard_and_sample(tiny_copy, what, edit, message):
    ds, _ = tiny_copy
    shard = _rewrite_sample(ds, "val/val-000002.tar", edit)
    with pytest.raises(RefbenchError, match=message) as e:
        _batches(eval_stream.eval_loader(ds, split="val", image_size=32, workers=2))
    assert str(shard) in e.value.message and "sample" in e.value.message


def test_missing_shard_manifest_and_split(tiny_copy, tmp_path):
    ds, _ = tiny_copy
    with pytest.raises(RefbenchError, match="manifest.json not found"):
        data.load_manifest(tmp_path / "elsewhere" / "refcoco_unc")
    with pytest.raises(RefbenchError, match="split 'testA'.*splits: train, val"):
        eval_stream.eval_loader(ds, split="testA")
    (ds / "val" / "val-000000.tar").unlink()
    with pytest.raises(RefbenchError, match="val-000000.tar"):
        _batches(eval_stream.eval_loader(ds, split="val"))
    with pytest.raises(RefbenchError, match="val-000000.tar is missing"):
        data.verify_shards(data.load_manifest(ds), ds, "val")
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(RefbenchError, match="v2"):
        data.load_manifest(ds)


def test_verify_shards_passes_on_good_shards(tiny):
    ds, _ = tiny
    assert data.verify_shards(data.load_manifest(ds), ds, "train") == 4


# --------------------------------------------------------------------------------- prepared synthetic data


def test_pipelines_on_prepared_synthetic_data(shards_root, synth_root):
    """On `refbench synth` + `refbench prepare` output: eval yields exactly the sentences of the
    raw refs pickle, split by split; train batches are well formed."""
    from refbench.data.datasets import is_gres
    from refbench.data.sources import grefer, refer

    root, raw = Path(shards_root), Path(synth_root)
    names = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
    assert names, root
    for name in names:
        ds = root / name
        manifest = data.load_manifest(ds)
        L = manifest["tokenizer"]["context_length"]
        gres = is_gres(name)  # gRefCOCO: grefs(unc).json, and a no-target ref's mask is empty
        refs = (grefer.load_grefs(grefer.refs_path(raw, manifest["split_by"])) if gres
                else refer.load_refs(raw / manifest["dataset"] / f"refs({manifest['split_by']}).p"))
        for split in manifest["splits"]:
            expected = sorted(s["sent_id"] for r in refs if r["split"] == split for s in r["sentences"])
            loader = eval_stream.eval_loader(ds, manifest, split=split, image_size=64, batch_size=32, workers=2)
            got = [i for b in loader for i in b["sent_id"]]
            assert sorted(got) == expected, (name, split)
        train = train_stream.train_loader(ds, manifest, batch_size=4, image_size=64, num_batches=3, workers=2)
        for b in train:
            assert b["tokens"].shape == (4, L) and torch.all((b["tokens"] == EOT).sum(1) == 1)
            assert gres or torch.all(b["mask"].flatten(1).sum(1) > 0)


def test_shard_json_reads_as_the_standard_library_reads_it(shards_root):
    """The readers parse the shards' JSON with orjson (refbench.data.shards._parse_meta): on every
    sample of every prepared synthetic dataset it gives exactly json.loads's objects (floats included)."""
    import tarfile

    import orjson

    n = 0
    for tar in sorted(Path(shards_root).rglob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    raw = t.extractfile(member).read()
                    assert orjson.loads(raw) == json.loads(raw), (tar, member.name)
                    n += 1
    assert n > 100
