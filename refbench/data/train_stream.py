"""The training stream over prepared shards: seeded epoch plans, one random sentence per ref,
a ref-level shuffle, lazy decoding, resumable at any batch.

train_loader / TrainLoader.epoch (one epoch of one rank; each worker's stream is infinite
underneath, cut at its last batch of the epoch):
    this (rank, worker)'s part of the epoch plan (seeded)  ->  tar samples (sha256 + count checked)
    ->  one record per ref, one random sentence each  ->  ref-level shuffle buffer, drained per pass
    ->  [the part again, forever]  ->  batches of refs  ->  [skip the first k on resume]
    ->  decode + letterbox + collate  ->  [stop after this worker's batches of the epoch]
    {"image": uint8[B,3,S,S], "content": int64[B,4], "tokens": int64[B,L], "mask": uint8[B,1,S,S],
     "sent_id": int64[B], "ref_id": int64[B], "no_target": bool[B]}
    ("no_target": the ref names nothing, gRefCOCO's shard field (refbench.data.sources.grefer.shard_fields);
    its mask is empty. False for every RefCOCO ref.)

Worker processes. A training run streams every epoch through one `TrainLoader`: one
DataLoader with persistent workers, forked once per run and restarted on each epoch's stream
(the epoch and the batches to skip reach them through a shared-memory tensor), and each worker
stops at its last batch of the epoch, so none makes batches past it. Training's validations
share one eval loader with persistent workers (`eval_loader(persistent=True)`). The batches are
those of a fresh loader of the same epoch. Measured on the lent H100 machine (16 cores; the
parent holding CUDA, EAVL rn101 and 8 GiB of pinned memory; 8 pinned workers, batch 16 at 480):
an epoch's first batch came 0.27-0.41 s after asking with workers forked for it, 0.11-0.14 s
from persistent ones; a saving per epoch and per validation, small beside a RefCOCO epoch.

Coverage. Every epoch, `epoch_plan` puts the split's shards in a seeded order, lays their
images end to end and cuts them into world x workers contiguous parts (sizes within one image):
each (rank, DataLoader worker) stream reads its own part, from its first image to its last, its
shuffle buffer drained at the end, and only then reads the part again. So an epoch of steps
reads every image once whatever the world size and worker count, every shard is read (and
sha256-checked) whole, and the ranks of one step see disjoint images. (Drawing whole shards
with replacement and restarting each at sample 0, webdataset's resampled=True, reads only the
first part of each shard once a stream needs fewer refs per epoch than a shard holds: at 16
ranks x 8 workers on RefCOCO a stream needs ~331 refs of a ~1,250-ref shard, and a simulation
with webdataset's own shuffle read 60.6% of the images over 20 epochs.) The loader stops after exactly `steps_per_epoch` batches on every rank;
a rank whose part holds fewer refs than its steps need reads it again (new sentences), one whose
part holds more leaves its last refs to the next epoch's plan, which cuts elsewhere.
A split with fewer images than ranks is refused.

Resume. `train_loader(..., epoch=e, skip_batches=k)` yields batches k, k+1, ... of epoch e,
equal to the uninterrupted stream. Images are decoded lazily (once per image, shared by its
refs) when a batch is built, so a skipped batch costs reading its tar bytes, parsing the JSON
and the RNG draws, but no JPEG or mask decoding: 5-8% of the CPU time of a real batch
(measured: 4 ms vs 85 ms at 480, 2.3 ms vs 27 ms at 128, batch 16, 640x480 JPEGs).
Memory: a decoded image stays while any of its refs waits in the shuffle buffer, so a worker
holds at most `shuffle_buffer` letterboxed uint8 images (0.5 MB each at 480), in practice a
fraction of that.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from refbench.data import transforms
from refbench.data.shards import (
    EVAL_INPUTS,
    REPREPARE,
    Loader,
    Piece,
    _batch_tensor,
    _close_dataloader,
    _cris_input,
    _cut,
    _dataloader,
    _decode_image,
    _decode_mask,
    _failures_as_items,
    _parse_meta,
    _rng,
    _shard_samples,
    _worker,
    load_manifest,
    split_shards,
    steps_per_epoch,
)
from refbench.distributed import dist_info
from refbench.errors import RefbenchError

# --------------------------------------------------------------------------------- train


class _LazyImage:
    """One image's JPEG bytes, decoded and letterboxed on first use, shared by its refs.

    preprocess "letterbox": (uint8 [new_h, new_w, 3], Letterbox); "cris": (uint8 [S, S, 3] warped
    with CRIS's cubic affine letterbox, cvwarp.CrisWarp).
    """

    __slots__ = ("url", "key", "meta", "size", "jpeg", "decoded", "preprocess")

    def __init__(self, url: str, key: str, meta: dict, jpeg: bytes, size: int, preprocess: str = "letterbox"):
        self.url, self.key, self.meta, self.jpeg, self.size = url, key, meta, jpeg, size
        self.preprocess = preprocess
        self.decoded: tuple[np.ndarray, Any] | None = None

    def get(self) -> tuple[np.ndarray, Any]:
        if self.decoded is None:
            if self.preprocess == "cris":
                self.decoded = _cris_input(self.url, self.key, self.jpeg, self.meta, self.size, normalise=False)
            else:
                self.decoded = _decode_image(self.url, self.key, self.jpeg, self.meta, self.size)
            self.jpeg = b""  # the bytes are no longer needed
        return self.decoded


@dataclass(frozen=True)
class _TrainRef:
    """One ref with the sentence drawn for it, before decoding."""

    image: _LazyImage
    ref: dict  # the ref's JSON (mask RLE, ids)
    sentence: dict  # the drawn sentence (sent_id, tokens)


def epoch_plan(entries: list[dict], *, seed: int, epoch: int, world: int, workers: int) -> list[list[list[Piece]]]:
    """Which images each (rank, worker) stream reads in an epoch: plan[rank][worker] = pieces.

    The shards are put in a seeded order for the epoch, their images laid end to end and cut
    into `world` contiguous parts, each cut again into `workers` parts (image counts differ by
    at most one). Every image of the split is in exactly one part, so an epoch of steps reads
    every image once, whatever the world size and worker count; the order (and so which ranks
    share a shard at a cut) changes every epoch. `workers` 0 means the main process (one part).
    """
    order = sorted(entries, key=lambda e: e["url"])
    _rng(seed, epoch, "shard order").shuffle(order)
    pieces = [(e["url"], 0, int(e["samples"])) for e in order if int(e["samples"]) > 0]
    return [_cut(rank_part, max(1, workers)) for rank_part in _cut(pieces, world)]


def _planned_samples(part: list[Piece], by_url: dict[str, dict], verify: bool, seed: tuple,
                     size: int, context_length: int, shuffle_buffer: int, preprocess: str = "letterbox") -> Iterator[_TrainRef]:
    """Pipeline source of one worker: its part of the epoch, refs expanded and shuffled, then the
    same part again (new sentences, new shuffle), forever. Each pass drains its shuffle buffer
    before the next begins, so every ref of the part comes out before any repeats."""
    for cycle in itertools.count():
        refs = _expand_train(
            _shard_samples(({"url": u, "start": a, "stop": b} for u, a, b in part), by_url, verify),
            rng=_rng(*seed, cycle, "sentences"), size=size, context_length=context_length, preprocess=preprocess,
        )
        yield from wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=_rng(*seed, cycle, "shuffle"))(refs)


def _expand_train(samples: Iterable[dict], rng: random.Random, size: int, context_length: int,
                  preprocess: str = "letterbox") -> Iterator[_TrainRef]:
    """Pipeline stage: image samples -> one `_TrainRef` per ref, with one random sentence each."""
    for sample in samples:
        meta = _parse_meta(sample, context_length)
        image = _LazyImage(sample["__url__"], sample["__key__"], meta, sample["jpg"], size, preprocess)
        for ref in meta["refs"]:
            yield _TrainRef(image, ref, ref["sentences"][rng.randrange(len(ref["sentences"]))])


def _collate_train(refs: list[_TrainRef], size: int) -> dict:
    """Decode (images once), letterbox and stack a batch of refs (uint8; normalised by `to_device`).

    Under CRIS's preprocessing (refbench.data.cvwarp) the images are CLIP-normalised here, as CRIS does,
    and the masks are its soft targets: both float32 ("content" spans the whole input).
    """
    n = len(refs)
    cris = bool(refs) and refs[0].image.preprocess == "cris"
    images = _batch_tensor(n, 3, size, size, dtype=torch.float32 if cris else torch.uint8)  # [B, 3, S, S]
    masks = _batch_tensor(n, 1, size, size, dtype=torch.float32 if cris else torch.uint8)  # [B, 1, S, S]
    content = torch.empty(n, 4, dtype=torch.int64)  # [B, 4]: top, left, height, width
    mask_view = masks.numpy()  # filled with numpy: single-threaded, no intra-op thread contention
    for b, r in enumerate(refs):
        mask = _decode_mask(r.image.url, r.image.key, r.ref, r.image.meta)  # uint8 [H, W] of 0/1
        if cris:  # CRIS's input and its soft target (INTER_LINEAR warp / 255)
            from refbench.data import cvwarp

            warped, warp = r.image.get()
            images[b] = cvwarp.normalize(warped)
            content[b] = torch.tensor([0, 0, size, size])
            cvwarp.cris_train_mask(mask, warp, out=mask_view[b, 0])
            continue
        rgb, box = r.image.get()
        transforms.letterbox_uint8(rgb, box, out=images[b])
        content[b] = torch.tensor(transforms.content_box(box))
        transforms.mask_to_input(mask, box, out=mask_view[b, 0])
    return {
        "image": images,
        "content": content,
        "tokens": torch.tensor([r.sentence["tokens"] for r in refs], dtype=torch.int64),  # [B, L]
        "mask": masks,
        "sent_id": torch.tensor([r.sentence["sent_id"] for r in refs], dtype=torch.int64),  # [B]
        "ref_id": torch.tensor([r.ref["ref_id"] for r in refs], dtype=torch.int64),  # [B]
        "no_target": torch.tensor([bool(r.ref.get("no_target", False)) for r in refs], dtype=torch.bool),  # [B]
    }


def _skip_then_collate(batches: Iterable[list[_TrainRef]], skip: int, count: int, size: int) -> Iterator[dict]:
    """Pipeline stage: drop the first `skip` batches undecoded, collate the next `count`, stop."""
    for i, refs in enumerate(itertools.islice(batches, skip + count)):
        if i >= skip:
            yield _collate_train(refs, size)


class _TrainStream(IterableDataset):
    """One rank's train batches of one epoch; each DataLoader worker builds its own pipeline.

    Which epoch, and how many of its batches to skip, is read from `state` (int64 [2]: epoch,
    skip_batches) each time an iteration starts. With persistent DataLoader workers the stream
    is pickled into each worker once, so `state` lives in shared memory: the main process writes
    the next epoch into it before it starts the next iteration, and every worker, restarted on
    its new stream, reads it there.
    """

    def __init__(self, entries: list[dict], *, state: torch.Tensor, batch_size: int, size: int, seed: int, rank: int,
                 world: int, workers: int, num_batches: int, shuffle_buffer: int, context_length: int, verify: bool,
                 preprocess: str = "letterbox"):
        super().__init__()
        self.preprocess = preprocess
        self.entries, self.state = entries, state
        self.batch_size, self.size, self.seed = batch_size, size, seed
        self.rank, self.world, self.workers, self.num_batches = rank, world, workers, num_batches
        self.shuffle_buffer, self.context_length, self.verify = shuffle_buffer, context_length, verify

    def __iter__(self) -> Iterator:
        epoch, skip_batches = (int(v) for v in self.state.tolist())  # read once, when the iteration starts
        parts = epoch_plan(self.entries, seed=self.seed, epoch=epoch, world=self.world, workers=self.workers)[self.rank]
        worker, num_workers = _worker()
        # In the uninterrupted stream, batch g comes from worker g % num_workers (in-order round
        # robin). A loader resumed at batch k starts its round robin at worker 0, so its worker j
        # plays the part of worker (j + k) % num_workers and drops that worker's batches < k.
        # Each worker stops after its last batch of the epoch (so no batch beyond the epoch is
        # made and thrown away, and persistent workers are idle between epochs).
        role = (worker + skip_batches) % num_workers
        skip = len(range(role, skip_batches, num_workers))
        count = len(range(skip_batches + worker, self.num_batches, num_workers))
        seed = (self.seed, epoch, self.rank, role)
        part = parts[role] if len(parts) == num_workers else parts[0]
        if not part:  # fewer images than streams: this worker reads the whole rank's share
            part = [p for ps in parts for p in ps]
        pipeline = wds.DataPipeline(
            functools.partial(_planned_samples, part, {e["url"]: e for e in self.entries}, self.verify, seed,
                              self.size, self.context_length, self.shuffle_buffer, self.preprocess),
            wds.batched(self.batch_size, collation_fn=None, partial=False),
            functools.partial(_skip_then_collate, skip=skip, count=count, size=self.size),
        )
        return _failures_as_items(pipeline)


class TrainLoader:
    """One rank's train stream over a whole run: `epoch(e, skip_batches=k)` is the Loader of
    batches k, k+1, ... of epoch e.

    One DataLoader serves every epoch. With `workers` > 0 and `persistent` (the default) its
    worker processes are forked once and live across epochs: each new epoch restarts them on
    the epoch's stream (the epoch and skip reach them through shared memory, `_TrainStream`),
    instead of forking `workers` new processes per epoch. The batches are exactly those of a
    fresh loader of the same epoch (`train_loader`). `close()` (or `with`) stops the workers.

    Arguments as `train_loader`'s; `num_batches` is the length of every epoch.
    """

    def __init__(self, dataset_dir: str | Path, manifest: dict | None = None, *, batch_size: int, image_size: int = 480,
                 num_batches: int | None = None, seed: int = 0, workers: int = 0, rank: int | None = None,
                 world: int | None = None, split: str = "train", shuffle_buffer: int = 1000, verify: bool = True,
                 pin_memory: bool = False, preprocess: str = "letterbox", persistent: bool = True):
        if preprocess not in EVAL_INPUTS:
            raise RefbenchError(f"unknown preprocessing {preprocess!r}; known: {', '.join(EVAL_INPUTS)}")
        self.rank, self.world = dist_info(rank, world)
        manifest = load_manifest(dataset_dir) if manifest is None else manifest
        self.entries = split_shards(manifest, dataset_dir, split)
        if not self.entries:
            raise RefbenchError(f"split {split!r} of {dataset_dir} has no shards", hint=REPREPARE)
        images = sum(int(e["samples"]) for e in self.entries)
        if images < self.world:
            raise RefbenchError(
                f"split {split!r} of {dataset_dir} has {images} image(s), fewer than the {self.world} ranks "
                f"(each rank trains on its own images)",
                hint="train on fewer ranks, or on a dataset with more images",
            )
        self.seed, self.workers = seed, workers
        self.steps = steps_per_epoch(manifest, split, batch_size * self.world) if num_batches is None else num_batches
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, skip_batches), read by the workers
        stream = _TrainStream(
            self.entries, state=self.state, batch_size=batch_size, size=image_size, seed=seed, rank=self.rank,
            world=self.world, workers=workers, num_batches=self.steps, shuffle_buffer=shuffle_buffer,
            context_length=manifest["tokenizer"]["context_length"], verify=verify, preprocess=preprocess,
        )
        self.dataloader = _dataloader(stream, workers, pin_memory, persistent=persistent)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Loader:
        """Batches `skip_batches`, ..., end of epoch `epoch` (iterate it before asking for the next epoch)."""
        if not 0 <= skip_batches <= self.steps:
            raise ValueError(f"skip_batches={skip_batches} is outside an epoch of {self.steps} batches")
        self.state[0], self.state[1] = epoch, skip_batches
        parts = epoch_plan(self.entries, seed=self.seed, epoch=epoch, world=self.world, workers=self.workers)[self.rank]
        pieces = [p for ps in parts for p in ps]  # this rank's images this epoch: disjoint from every other rank's
        return Loader(self.dataloader, self.steps - skip_batches, limit=True, steps_per_epoch=self.steps,
                      workers=self.workers, shards=sorted({url for url, _, _ in pieces}), pieces=pieces)

    def close(self) -> None:
        """Stop the worker processes (a no-op without workers)."""
        _close_dataloader(self.dataloader)

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def train_loader(
    dataset_dir: str | Path,
    manifest: dict | None = None,
    *,
    batch_size: int,
    image_size: int = 480,
    epoch: int = 0,
    skip_batches: int = 0,
    num_batches: int | None = None,
    seed: int = 0,
    workers: int = 0,
    rank: int | None = None,
    world: int | None = None,
    split: str = "train",
    shuffle_buffer: int = 1000,
    verify: bool = True,
    pin_memory: bool = False,
    preprocess: str = "letterbox",
) -> Loader:
    """Batches `skip_batches`, ..., `num_batches` - 1 of epoch `epoch` of this rank's train stream.

    dataset_dir: a prepared `<dataset>_<splitby>` folder (manifest read from it unless given);
    batch_size: refs per batch on this rank; image_size: square input side; num_batches: batches
    in an epoch, default ceil(refs of `split` / (batch_size x world)), the same on every rank;
    workers: DataLoader workers (any number, also more than shards); shuffle_buffer: refs held
    by the ref-level shuffle; rank r of `world` reads its own contiguous share of the epoch's
    images (`epoch_plan`; `loader.shards`, `loader.pieces`). With skip_batches=k the batches
    equal those of the uninterrupted stream of (seed, epoch, rank, world, workers).
    preprocess: "letterbox" (refbench.data.transforms, nearest-resized 0/1 masks) or "cris" (CRIS's
    OpenCV chain, refbench.data.cvwarp: cubic image warp, soft INTER_LINEAR masks).

    One epoch, workers forked for it; a run over many epochs uses `TrainLoader`, whose workers
    live across epochs.
    """
    return TrainLoader(
        dataset_dir, manifest, batch_size=batch_size, image_size=image_size, num_batches=num_batches, seed=seed,
        workers=workers, rank=rank, world=world, split=split, shuffle_buffer=shuffle_buffer, verify=verify,
        pin_memory=pin_memory, preprocess=preprocess, persistent=False,
    ).epoch(epoch, skip_batches)
