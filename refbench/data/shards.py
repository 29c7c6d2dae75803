"""Webdataset pipelines over prepared shards (docs/shards.md, schema v1): train and eval.

Shards hold one sample per image (original JPEG bytes + JSON with its refs, RLE masks and
tokenized sentences). Two pipelines read them, each a list of small webdataset stages:

train_loader / TrainLoader.epoch (one epoch of one rank; each worker's stream is infinite
underneath, cut at its last batch of the epoch):
    this (rank, worker)'s part of the epoch plan (seeded)  ->  tar samples (sha256 + count checked)
    ->  one record per ref, one random sentence each  ->  ref-level shuffle buffer, drained per pass
    ->  [the part again, forever]  ->  batches of refs  ->  [skip the first k on resume]
    ->  decode + letterbox + collate  ->  [stop after this worker's batches of the epoch]
    {"image": uint8[B,3,S,S], "content": int64[B,4], "tokens": int64[B,L], "mask": uint8[B,1,S,S],
     "sent_id": int64[B], "ref_id": int64[B]}

eval_loader (every sentence of every ref of a split exactly once, fixed order):
    this (rank, worker)'s run of the split's sentences (eval_plan; below shard granularity when
    there are more streams than shards)  ->  tar samples of its shards (the stream that ends a
    shard reads it whole and checks it)  ->  decode each image with a sentence in the run once,
    one item per sentence  ->  batches (custom collate)
    {"image": uint8[B,3,S,S] (float32 under CRIS's preprocessing), "content": int64[B,4],
     "tokens": int64[B,L], "swap_tokens": int64[B,L] and "has_swap": bool[B] (a sentence of
     another ref of the same image, for refbench.sensitivity: `swap_tokens`),
     "gt": uint8[B,max H,max W] (the GT masks, zero-padded)} + lists:
    sent_id, ref_id, image_id, category_id, sent, height, width, letterbox
    (transforms.Letterbox), warp (cvwarp.CrisWarp under CRIS's preprocessing, else None),
    gt_mask (uint8 [H,W], views of "gt")

Images leave the loaders as uint8 letterboxes (padding 0) with their content box (top, left,
height, width), masks as uint8 0/1: `to_device` moves a batch to the model's device and
normalises there (`transforms.normalize_batch`), so the CPU never touches a float image and a
batch is a quarter of the bytes to collate, pin and copy. (CRIS's own preprocessing, the
`cris` protocol, keeps its float input made exactly as CRIS makes it; `to_device` passes a
float image through.)

Determinism. Every random choice (which shard, which sentence, the shuffle) comes from RNGs
seeded by (seed, epoch, rank, DataLoader worker id), never from the global RNGs or the clock.
The DataLoader hands out batches round-robin over workers in order, so the stream of batches
is a function of (seed, epoch, rank, world, batch size, input size, workers).

Worker processes. A training run streams every epoch through one `TrainLoader`: one
DataLoader with persistent workers, forked once per run and restarted on each epoch's stream
(the epoch and the batches to skip reach them through a shared-memory tensor), and each worker
stops at its last batch of the epoch, so none makes batches past it. Training's validations
share one eval loader with persistent workers (`eval_loader(persistent=True)`). The batches are
those of a fresh loader of the same epoch. Measured on the lent H100 machine (16 cores; the
parent holding CUDA, EAVL rn101 and 8 GiB of pinned memory; 8 pinned workers, batch 16 at 480):
an epoch's first batch came 0.27-0.41 s after asking with workers forked for it, 0.11-0.14 s
from persistent ones; a saving per epoch and per validation, small beside a RefCOCO epoch.

Eval parallelism. `eval_plan` cuts a split's sentences, not its shards, so world x workers
streams all work however few shards a split has (RefCOCO val: 3 shards; at 16 GPUs 13 ranks
used to idle). On one H100, scoring EAVL rn101 in float32 at 480 is GPU-bound (~155
sentences/s on a one-shard split with 1, 8 or 16 workers alike): the gain is in the share of
the split each of many GPUs scores, which one lent GPU cannot show.

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

Errors. A missing or corrupt shard (truncated tar, a flipped byte anywhere, bad JPEG, bad JSON)
raises `RefbenchError` naming the shard file, also from inside DataLoader workers (the worker
sends the error down the stream; the loader raises it as one line). Each shard's sample count
is checked against the manifest at its end, and with `verify=True` (default) its sha256 is
computed while streaming (no second read; sha256 runs at ~1.7 GB/s, so the cost is within
measurement noise), so a byte flipped in JPEG data that PIL would decode silently, or a tar
header damaged so that tarfile would end the archive early, is still caught at the end of that
shard (samples of it already yielded are not recalled: the run stops with the error). In
eval, a shard cut between streams is read whole and checked by the stream holding its last
sentence (the others stop reading at the end of their run), which also checks its sentence
count; `refbench eval` raises that stream's error on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from refbench import remote
from refbench.data import transforms
from refbench.data.datasets import SCHEMA, SCHEMA_VERSION, prepare_command, prepared_names
from refbench.distributed import dist_info
from refbench.errors import RefbenchError

REPREPARE = "re-run `refbench prepare` for this dataset (or copy the shard again)"  # hint for bad shards


# --------------------------------------------------------------------------------- manifest


def load_manifest(dataset_dir: str | Path) -> dict:
    """The checked manifest of a prepared dataset folder (or URL, refbench.remote) `<shard root>/<dataset>_<splitby>`."""
    if remote.is_url(dataset_dir):
        root, _, name = str(dataset_dir).rstrip("/").rpartition("/")
    else:
        dataset_dir = Path(dataset_dir)
        name, root = dataset_dir.name, dataset_dir.parent
    if name not in prepared_names():
        raise RefbenchError(f"unknown dataset {name!r}; prepared datasets are named {', '.join(prepared_names())}")
    path = remote.join(dataset_dir, "manifest.json")  # a file, or a URL
    try:
        manifest = json.loads(remote.read_bytes(path))
    except FileNotFoundError:
        raise RefbenchError(f"{path} not found: {name} is not prepared under {root}",
                            hint=prepare_command(name, root)) from None
    except (OSError, ValueError) as e:
        raise RefbenchError(f"{path}: unreadable manifest ({e})", hint=prepare_command(name, root)) from None
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise RefbenchError(
            f"{path}: shard schema {manifest.get('schema')!r} v{manifest.get('schema_version')}, "
            f"this refbench reads {SCHEMA!r} v{SCHEMA_VERSION}", hint=prepare_command(name, root))
    return manifest


def split_shards(manifest: dict, dataset_dir: str | Path, split: str) -> list[dict]:
    """The manifest's shard entries of `split`, sorted by path, each with "url" = its file path or URL."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise RefbenchError(
            f"split {split!r} is not in {remote.join(dataset_dir, 'manifest.json')}; splits: {', '.join(splits) or 'none'}"
        )
    entries = sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["path"])
    return [{**s, "url": str(remote.join(dataset_dir, s["path"]))} for s in entries]


def verify_shards(manifest: dict, dataset_dir: str | Path, split: str) -> int:
    """Check every shard of `split` exists and has the manifest's sha256; returns how many.

    Reads every byte once (about 1 s per GB); raises `RefbenchError` naming the first bad shard.
    """
    entries = split_shards(manifest, dataset_dir, split)
    for s in entries:
        if not remote.is_url(s["url"]) and not Path(s["url"]).is_file():
            raise RefbenchError(f"shard {s['url']} is missing", hint=REPREPARE)
        try:
            digest = remote.sha256(s["url"])
        except OSError as e:
            raise RefbenchError(f"shard {s['url']} cannot be read ({e.strerror or e})", hint=REPREPARE) from None
        if digest != s["sha256"]:
            raise RefbenchError(f"shard {s['url']} is corrupt: its sha256 differs from the manifest", hint=REPREPARE)
    return len(entries)


def steps_per_epoch(manifest: dict, split: str, global_batch: int) -> int:
    """Optimizer steps in one epoch: ceil(refs of `split` / global batch size)."""
    return math.ceil(manifest["splits"][split]["refs"] / global_batch)


# --------------------------------------------------------------------------------- reading shards


class _HashingReader:
    """A read-only file wrapper that hashes the bytes as tarfile streams them."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        """Read (and hash) what tarfile left unread (end-of-archive padding); the hex digest."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def _shard_error(url: str, exn: BaseException) -> RefbenchError:
    detail = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__  # wds appends " @ <stream>"
    return RefbenchError(f"shard {url} is corrupt ({type(exn).__name__}: {detail})", hint=REPREPARE)


def _raise_for_shard(url: str):
    """A webdataset exception handler that re-raises as a RefbenchError naming the shard."""

    def handler(exn: BaseException) -> bool:
        if isinstance(exn, RefbenchError):  # e.g. a broken connection (refbench.remote): not corruption
            raise exn
        raise _shard_error(url, exn) from None

    return handler


def _read_shard(entry: dict, verify: bool, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "json"} of one shard, those numbered start <= i < stop;
    the whole file is read either way, so its sample count and sha256 are always checked."""
    url = entry["url"]
    try:
        f = remote.open_stream(url)  # a URL streams, reconnecting at the byte reached (bounded retries)
    except OSError as e:
        hint = remote.NETWORK_HINT if remote.is_url(url) and not isinstance(e, FileNotFoundError) else REPREPARE
        raise RefbenchError(f"shard {url} cannot be read ({e.strerror or e})", hint=hint) from None
    with f:
        reader = _HashingReader(f)
        handler = _raise_for_shard(url)

        def files() -> Iterator[dict]:
            for member in tar_file_iterator(reader, handler=handler):
                member["__url__"] = url
                yield member

        samples = group_by_keys(files(), handler=handler)
        count = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except RefbenchError:
                raise
            except Exception as e:  # tarfile.ReadError on truncation, and the like
                raise _shard_error(url, e) from None
            count += 1
            if start < count and (stop is None or count <= stop):
                yield sample
        digest = reader.drain()
    if verify and digest != entry["sha256"]:
        raise RefbenchError(f"shard {url} is corrupt: its sha256 differs from the manifest", hint=REPREPARE)
    if count != entry["samples"]:
        raise RefbenchError(f"shard {url} is corrupt: it holds {count} samples, the manifest says {entry['samples']}", hint=REPREPARE)


def _shard_samples(shards: Iterable[dict], by_url: dict[str, dict], verify: bool) -> Iterator[dict]:
    """Pipeline stage: {"url": ..., optional "start", "stop"} shard references -> the samples of
    each shard (or of its sample range) in turn."""
    for shard in shards:
        yield from _read_shard(by_url[shard["url"]], verify, shard.get("start", 0), shard.get("stop"))


def split_samples(manifest: dict, dataset_dir: str | Path, split: str, verify: bool = True) -> Iterator[dict]:
    """Every sample {"__key__", "__url__", "jpg", "json"} of every shard of `split`, in shard order,
    in this process: no node or worker split (any rank of any world may call it, alone)."""
    entries = split_shards(manifest, dataset_dir, split)
    return _shard_samples(({"url": e["url"]} for e in entries), {e["url"]: e for e in entries}, verify)


_REQUIRED = {  # keys of the shard JSON the loaders read (docs/shards.md), by level
    "image": ("image_id", "height", "width", "refs"),
    "ref": ("ref_id", "category_id", "mask", "sentences"),
    "sentence": ("sent_id", "sent", "tokens"),
}


def _require(obj: Any, level: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{level} entry is {type(obj).__name__}, not an object")
    missing = [k for k in _REQUIRED[level] if k not in obj]
    if missing:
        raise ValueError(f"{level} entry lacks {', '.join(missing)}")


def _parse_meta(sample: dict, context_length: int) -> dict:
    """The sample's JSON, checked for what the loaders use; RefbenchError naming the shard if bad."""
    where = f"shard {sample['__url__']} sample {sample['__key__']}"
    if "jpg" not in sample or "json" not in sample:
        has = sorted(k for k in sample if not k.startswith("__"))
        raise RefbenchError(f"{where} lacks its .jpg or .json member (has {has})", hint=REPREPARE)
    try:
        meta = json.loads(sample["json"])
        _require(meta, "image")
        meta["height"], meta["width"] = int(meta["height"]), int(meta["width"])
        if not isinstance(meta["refs"], list):
            raise ValueError("refs is not a list")
        for ref in meta["refs"]:
            _require(ref, "ref")
            if not ref["sentences"]:
                raise ValueError(f"ref {ref['ref_id']} has no sentences")
            for s in ref["sentences"]:
                _require(s, "sentence")
                if len(s["tokens"]) != context_length:
                    raise ValueError(f"sentence {s['sent_id']} has {len(s['tokens'])} tokens, the manifest says {context_length}")
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise RefbenchError(f"{where} has bad JSON ({e})", hint=REPREPARE) from None
    return meta


def _decode_image(sample_url: str, key: str, jpeg: bytes, meta: dict, size: int) -> tuple[np.ndarray, transforms.Letterbox]:
    """JPEG bytes -> letterboxed uint8 [new_h, new_w, 3]; RefbenchError naming the shard if bad."""
    try:
        rgb, box = transforms.decode_image(jpeg, size)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise RefbenchError(f"shard {sample_url} sample {key}: the JPEG does not decode ({e})", hint=REPREPARE) from None
    if (box.orig_w, box.orig_h) != (meta["width"], meta["height"]):
        raise RefbenchError(
            f"shard {sample_url} sample {key}: the JPEG is {box.orig_w}x{box.orig_h}, its JSON says {meta['width']}x{meta['height']}",
            hint=REPREPARE,
        )
    return rgb, box


def _decode_mask(sample_url: str, key: str, ref: dict, meta: dict) -> np.ndarray:
    """The ref's GT mask at the original size, uint8 [H, W] of 0/1, from its COCO RLE."""
    from pycocotools import mask as mask_utils

    rle = ref["mask"]
    try:
        if list(rle["size"]) != [meta["height"], meta["width"]]:
            raise ValueError(f"size {rle['size']} is not the image's [{meta['height']}, {meta['width']}]")
        coco_rle = {"size": list(rle["size"]), "counts": rle["counts"].encode()}
        mask = mask_utils.decode(coco_rle)  # uint8 [H, W]
        # pycocotools does not check that the runs cover the image: short counts leave garbage
        # (with every value <= 1, the count of nonzero pixels is the sum, ~7x cheaper to take)
        if mask.max(initial=0) > 1 or np.count_nonzero(mask) != int(mask_utils.area(coco_rle)):
            raise ValueError("its runs do not cover the image")
    except Exception as e:  # pycocotools raises ValueError/TypeError on bad counts
        raise RefbenchError(f"shard {sample_url} sample {key} ref {ref.get('ref_id')}: bad RLE mask ({e})", hint=REPREPARE) from None
    return mask


@dataclass
class _Failure:
    """A RefbenchError travelling down the stream (from a DataLoader worker) to the loader."""

    message: str
    hint: str | None


def _failures_as_items(stream: Iterable) -> Iterator:
    try:
        yield from stream
    except RefbenchError as e:
        yield _Failure(e.message, e.hint)


def _rng(*parts: Any) -> random.Random:
    """An RNG seeded from a tuple of ints/strings, independent of PYTHONHASHSEED and the clock."""
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little"))


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _batch_tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor for a batch; in a DataLoader worker it is allocated in shared
    memory, so sending it to the main process copies nothing (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(*shape, dtype=dtype)
    like = torch.empty(0, dtype=dtype)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(*shape)


def _identity(batch: Any) -> Any:
    return batch


class Loader:
    """An iterable of batches with a known length (len = batches this iteration yields).

    Attributes: `batches`, `sentences` (eval: sentences this rank scores), `steps_per_epoch`
    (train: batches in a whole epoch), `workers` (eval: after clamping), `shards` (this rank's
    shard files). A loader made with persistent workers keeps its worker processes between
    iterations until `close()` (or until it is garbage collected).
    """

    def __init__(self, dataloader: Iterable, batches: int, *, limit: bool, **info: Any):
        self.dataloader = dataloader
        self.batches = batches
        self._limit = limit  # cut the stream after `batches`
        for k, v in info.items():
            setattr(self, k, v)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.dataloader)  # persistent workers: the same processes, restarted on their new stream
        try:
            for batch in itertools.islice(batches, self.batches) if self._limit else batches:
                if isinstance(batch, _Failure):
                    raise RefbenchError(batch.message, batch.hint)
                yield batch
        finally:
            # Drop the DataLoader iterator now (without persistent workers its __del__ stops the
            # workers), also when an exception's traceback keeps this frame, and so its locals, alive.
            del batches

    def close(self) -> None:
        """Stop persistent worker processes now (a no-op without them)."""
        _close_dataloader(self.dataloader)


def _dataloader(stream: IterableDataset, num_workers: int, pin_memory: bool, persistent: bool = False) -> DataLoader:
    """The DataLoader over a stream of ready batches; `persistent` keeps its worker processes
    from one iteration to the next (each iteration calls the stream's __iter__ again in them)."""
    return DataLoader(
        stream, batch_size=None, collate_fn=_identity, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0, in_order=True,
    )


def _close_dataloader(dataloader: Any) -> None:
    """Shut down a DataLoader's persistent workers (torch stops them only when its iterator is
    garbage collected, which a reference cycle or a traceback can delay)."""
    it = getattr(dataloader, "_iterator", None)
    if it is not None:
        dataloader._iterator = None
        it._shutdown_workers()


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


Piece = tuple[str, int, int]  # (shard url, first sample, end sample): a contiguous run of one shard's images


def _cut(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """Split a run of pieces into `parts` contiguous parts whose image counts differ by at most one."""
    total = sum(stop - start for _, start, stop in pieces)
    bounds = [total * k // parts for k in range(parts + 1)]
    out: list[list[Piece]] = [[] for _ in range(parts)]
    offset = 0
    for url, start, stop in pieces:
        for k in range(parts):
            lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + stop - start)
            if lo < hi:
                out[k].append((url, start + lo - offset, start + hi - offset))
        offset += stop - start
    return out


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

    Under CRIS's preprocessing (refbench.cvwarp) the images are CLIP-normalised here, as CRIS does,
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
    preprocess: "letterbox" (refbench.transforms, nearest-resized 0/1 masks) or "cris" (CRIS's
    OpenCV chain, refbench.cvwarp: cubic image warp, soft INTER_LINEAR masks).

    One epoch, workers forked for it; a run over many epochs uses `TrainLoader`, whose workers
    live across epochs.
    """
    return TrainLoader(
        dataset_dir, manifest, batch_size=batch_size, image_size=image_size, num_batches=num_batches, seed=seed,
        workers=workers, rank=rank, world=world, split=split, shuffle_buffer=shuffle_buffer, verify=verify,
        pin_memory=pin_memory, preprocess=preprocess, persistent=False,
    ).epoch(epoch, skip_batches)


# --------------------------------------------------------------------------------- metadata only


def split_images(dataset_dir: str | Path, manifest: dict | None = None, *, split: str, verify: bool = True) -> Iterator[dict]:
    """The checked JSON of every image of `split`, in the eval order (shard order, image order).

    No JPEG is decoded: this is what `refbench sentences` and `refbench score` read (refs, RLE
    masks, sentences). Shards are checked as the loaders check them (sample count, and the
    sha256 with `verify`); a bad one raises `RefbenchError` naming it.
    """
    manifest = load_manifest(dataset_dir) if manifest is None else manifest
    context_length = manifest["tokenizer"]["context_length"]
    for entry in split_shards(manifest, dataset_dir, split):
        for sample in _read_shard(entry, verify):
            yield _parse_meta(sample, context_length)


# --------------------------------------------------------------------------------- to the device


def to_device(batch: dict, device: Any, *, non_blocking: bool = True, channels_last: bool = False) -> dict:
    """A loader batch on `device`, ready for the model: the uint8 tensors copied, then widened there.

    Returns a new dict: "image" float32 [B,3,S,S] CLIP-normalised with exact-0 padding
    (`transforms.normalize_batch`), "tokens" int64 [B,L], and for train batches "mask" float32
    [B,1,S,S] of 0/1; list fields (eval) are passed through. `non_blocking` overlaps the copy
    with compute when the batch is in pinned memory; `channels_last` lays the image out NHWC.
    """
    import torch

    device = torch.device(device)
    image = batch["image"].to(device, non_blocking=non_blocking)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    out = dict(batch)
    if image.dtype == torch.uint8:
        image = transforms.normalize_batch(image, batch["content"].to(device, non_blocking=non_blocking))
    out["image"] = image  # a float image (CRIS's preprocessing) is already normalised
    out["tokens"] = batch["tokens"].to(device, non_blocking=non_blocking)
    if "mask" in batch:
        out["mask"] = batch["mask"].to(device, non_blocking=non_blocking).float()
    return out


# --------------------------------------------------------------------------------- eval


def _letterbox_input(url: str, key: str, jpeg: bytes, meta: dict, size: int):
    """refbench's input: scaled decode, antialiased letterbox -> (uint8 [3,S,S], Letterbox, None)."""
    rgb, box = _decode_image(url, key, jpeg, meta, size)
    return transforms.letterbox_uint8(rgb, box), box, None


def _cris_input(url: str, key: str, jpeg: bytes, meta: dict, size: int, normalise: bool = True):
    """CRIS's input (refbench.cvwarp): cv2 decode, cubic affine warp -> (float32 [3,S,S], Letterbox, CrisWarp);
    with normalise=False: (uint8 [S,S,3] warped, CrisWarp)."""
    from refbench.data import cvwarp

    try:
        rgb = cvwarp.decode_rgb(jpeg)
    except Exception as e:
        raise RefbenchError(f"shard {url} sample {key}: the JPEG does not decode with OpenCV ({e})", hint=REPREPARE) from None
    if (rgb.shape[1], rgb.shape[0]) != (meta["width"], meta["height"]):
        raise RefbenchError(f"shard {url} sample {key}: the JPEG is {rgb.shape[1]}x{rgb.shape[0]}, "
                            f"its JSON says {meta['width']}x{meta['height']}", hint=REPREPARE)
    warped, warp = cvwarp.warp_image(rgb, size)
    if not normalise:
        return warped, warp
    return cvwarp.normalize(warped), transforms.Letterbox.fit(meta["width"], meta["height"], size), warp


# How the network input is made, by a protocol's `preprocess` (refbench.metrics.Protocol).
EVAL_INPUTS = {"letterbox": _letterbox_input, "cris": _cris_input}


def eval_plan(entries: list[dict], *, world: int, workers: int) -> list[list[list[Piece]]]:
    """Which sentences each (rank, worker) stream scores: plan[rank][worker] = pieces
    (shard url, first sentence, end sentence), sentences numbered within their shard in file
    order (image, ref, sentence).

    The split's sentences (shards in path order) are laid end to end and cut into `world`
    contiguous parts, each cut again into `workers` parts (sizes differ by at most one
    sentence; a rank's workers are clamped to its sentences). Every sentence is in exactly one
    part, so every rank and worker gets a share even when world x workers exceeds the shards
    of the split (RefCOCO val: 3 shards), and concatenating the parts in order gives the file
    order. `workers` 0 means the main process (one part). A pure function of its arguments.
    """
    pieces = [(e["url"], 0, int(e["sentences"])) for e in entries if int(e["sentences"]) > 0]
    plan = []
    for rank_part in _cut(pieces, world):
        sentences = sum(b - a for _, a, b in rank_part)
        plan.append(_cut(rank_part, max(1, min(workers, sentences))))
    return plan


def _piece_sentences(pieces: list[Piece], by_url: dict[str, dict], verify: bool, size: int, context_length: int,
                     preprocess: str = "letterbox") -> Iterator[dict]:
    """Pipeline source: pieces (shard url, first, end sentence) -> one item per sentence, in file order.

    Every image's JSON is parsed (to number its sentences), but only an image with a sentence in
    the piece is decoded, once, and only the GT masks of refs with one. The piece that ends at
    its shard's last sentence reads the shard to the end, so its sample count, its sentence
    count and (with `verify`) its sha256 are checked; a piece ending earlier stops reading
    there. Each shard ends exactly one piece of a plan, so each is checked by one stream.
    """
    make_input = EVAL_INPUTS[preprocess]
    for url, lo, hi in pieces:
        entry = by_url[url]
        total = int(entry["sentences"])
        n = 0  # sentences of the shard before the next image
        with contextlib.closing(_read_shard(entry, verify)) as samples:
            for sample in samples:
                key = sample["__key__"]
                meta = _parse_meta(sample, context_length)
                counts = [len(ref["sentences"]) for ref in meta["refs"]]
                first, n = n, n + sum(counts)
                if n <= lo or first >= hi:  # no sentence of this image is in the piece
                    if first >= hi and hi < total:
                        break  # past the piece: the rest of the shard is another stream's
                    continue
                image, box, warp = make_input(url, key, sample["jpg"], meta, size)  # [3, S, S], shared by the image's sentences
                i = first
                for r, (ref, count) in enumerate(zip(meta["refs"], counts)):
                    if i + count <= lo or i >= hi:
                        i += count
                        continue
                    gt = torch.from_numpy(_decode_mask(url, key, ref, meta))  # uint8 [H, W]
                    for j, s in enumerate(ref["sentences"]):
                        if lo <= i < hi:
                            yield {
                                "image": image, "tokens": s["tokens"], "swap_tokens": swap_tokens(meta["refs"], r, j),
                                "sent_id": s["sent_id"], "ref_id": ref["ref_id"],
                                "image_id": meta["image_id"], "category_id": ref["category_id"], "sent": s["sent"],
                                "height": meta["height"], "width": meta["width"], "letterbox": box, "warp": warp,
                                "gt_mask": gt,
                            }
                        i += 1
            else:  # read to the end: the shard holds what its manifest says
                if n != total:
                    raise RefbenchError(f"shard {url} is corrupt: it holds {n} sentences, the manifest says {total}",
                                        hint=REPREPARE)


def swap_tokens(refs: list[dict], r: int, j: int) -> list[int] | None:
    """The tokens of the sentence that stands in for sentence j of ref r when sentence
    sensitivity is measured (refbench.sensitivity): one of another ref of the same image (the
    next ref, cyclically; its sentence j modulo its count), or None when the image has one ref
    (or the other refs have no sentences)."""
    for step in range(1, len(refs)):
        other = refs[(r + step) % len(refs)]["sentences"]
        if other:
            return other[j % len(other)]["tokens"]
    return None


EVAL_LISTS = ("sent_id", "ref_id", "image_id", "category_id", "sent", "height", "width", "letterbox", "warp", "gt_mask")


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = _batch_tensor(len(tensors), *tensors[0].shape, dtype=tensors[0].dtype)
    np.stack([t.numpy() for t in tensors], out=out.numpy())
    return out


def collate_eval(items: list[dict]) -> dict:
    """Stack "image" uint8 [B,3,S,S], "content" [B,4] and "tokens" [B,L]; every other field becomes a list of B."""
    batch = {
        "image": _stack([it["image"] for it in items]),  # uint8 [B, 3, S, S]
        "content": torch.tensor([transforms.content_box(it["letterbox"]) for it in items], dtype=torch.int64),  # [B, 4]
        "tokens": torch.tensor([it["tokens"] for it in items], dtype=torch.int64),
        # a sentence of another ref of the same image (`swap_tokens`), own tokens where there is none
        "swap_tokens": torch.tensor([it["swap_tokens"] or it["tokens"] for it in items], dtype=torch.int64),
        "has_swap": torch.tensor([it["swap_tokens"] is not None for it in items], dtype=torch.bool),
    }
    for k in EVAL_LISTS:
        batch[k] = [it[k] for it in items]
    # the GT masks once, as one padded stack that scoring moves to its device in one copy;
    # "gt_mask" holds views of it (one tensor crosses from a worker, not B)
    batch["gt"] = pad_stack(batch["gt_mask"])  # uint8 [B, max H, max W], zero beyond each mask
    batch["gt_mask"] = [batch["gt"][i, : g.shape[0], : g.shape[1]] for i, g in enumerate(batch["gt_mask"])]
    return batch


def pad_stack(masks: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [H_b, W_b] masks -> one zero-padded uint8 [B, max H, max W] (shared memory in a worker)."""
    h, w = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    out = _batch_tensor(len(masks), h, w, dtype=torch.uint8)
    view = out.numpy()
    for i, m in enumerate(masks):
        view[i, : m.shape[0], : m.shape[1]] = m.numpy()
        view[i, m.shape[0]:, :] = 0
        view[i, : m.shape[0], m.shape[1]:] = 0
    return out


class _EvalStream(IterableDataset):
    """The sentences of one rank's part of a split (`eval_plan`); DataLoader worker w scores part w."""

    def __init__(self, entries: list[dict], parts: list[list[Piece]], *, batch_size: int, size: int,
                 context_length: int, verify: bool, preprocess: str = "letterbox"):
        super().__init__()
        self.entries, self.parts, self.batch_size, self.size = entries, parts, batch_size, size
        self.context_length, self.verify, self.preprocess = context_length, verify, preprocess

    def __iter__(self) -> Iterator:
        worker, num_workers = _worker()
        if num_workers != len(self.parts):
            raise RuntimeError(f"an eval stream of {len(self.parts)} parts read by {num_workers} workers")
        pipeline = wds.DataPipeline(
            functools.partial(_piece_sentences, self.parts[worker], {e["url"]: e for e in self.entries}, self.verify,
                              self.size, self.context_length, self.preprocess),
            wds.batched(self.batch_size, collation_fn=collate_eval, partial=True),
        )
        return _failures_as_items(pipeline)


def eval_loader(
    dataset_dir: str | Path,
    manifest: dict | None = None,
    *,
    split: str = "val",
    image_size: int = 480,
    batch_size: int = 16,
    workers: int = 0,
    rank: int | None = None,
    world: int | None = None,
    verify: bool = True,
    pin_memory: bool = False,
    preprocess: str = "letterbox",
    persistent: bool = False,
) -> Loader:
    """Every sentence of every ref of this rank's part of `split`, once, in a fixed order.

    `preprocess` makes the network input: "letterbox" (refbench.transforms) or "cris" (CRIS's
    OpenCV chain, refbench.cvwarp; each item then also carries its `warp`, else None).

    The split's sentences are cut into world x workers contiguous parts (`eval_plan`), below
    shard granularity where there are more streams than shards: rank r scores part r, its
    DataLoader worker w sub-part w (`workers` is clamped to the rank's sentences; a rank
    without sentences yields nothing). The order is fixed for a given (world, workers): file
    order within each worker's part (shard, image, ref_id, sentence), batches interleaved
    round-robin over workers; the ranks' parts in rank order tile the split in file order.
    `len(loader)` is the number of batches; `loader.sentences` the number of sentences this
    rank yields, `loader.pieces` its (shard, first, end sentence) runs. With `persistent` the
    worker processes live from one iteration to the next (training's repeated validations);
    `loader.close()` stops them.
    """
    rank, world = dist_info(rank, world)
    manifest = load_manifest(dataset_dir) if manifest is None else manifest
    entries = split_shards(manifest, dataset_dir, split)
    parts = eval_plan(entries, world=world, workers=workers)[rank]
    pieces = [p for ps in parts for p in ps]
    sentences = sum(b - a for _, a, b in pieces)
    workers = len(parts) if workers and sentences else 0
    batches = sum(math.ceil(sum(b - a for _, a, b in part) / batch_size) for part in parts)
    info = dict(sentences=sentences, workers=workers, shards=list(dict.fromkeys(url for url, _, _ in pieces)),
                pieces=pieces)
    if not sentences:
        return Loader([], 0, limit=False, **info)
    if preprocess not in EVAL_INPUTS:
        raise RefbenchError(f"unknown preprocessing {preprocess!r}; known: {', '.join(EVAL_INPUTS)}")
    stream = _EvalStream(
        entries, parts, batch_size=batch_size, size=image_size, context_length=manifest["tokenizer"]["context_length"],
        verify=verify, preprocess=preprocess,
    )
    return Loader(_dataloader(stream, workers, pin_memory, persistent=persistent), batches, limit=False, **info)
