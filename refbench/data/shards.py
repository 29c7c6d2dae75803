"""Prepared shards (docs/shards.md, schema v1) read back: the manifest, checked tar streams, one
image's JSON, JPEG and masks decoded, the network input made, a batch moved to the device.

Shards hold one sample per image (original JPEG bytes + JSON with its refs, RLE masks and
tokenized sentences). Two pipelines read them through this module: the training stream
(refbench.data.train_stream) and the eval loader (refbench.data.eval_stream); `split_images`
reads the JSON alone (`refbench sentences`, `refbench score`).

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

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from refbench import remote
from refbench.data import transforms
from refbench.data.datasets import SCHEMA, SCHEMA_VERSION, prepare_command, prepared_names
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
        meta = orjson.loads(sample["json"])  # as json.loads, about 3x faster on the shards' JSON
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
    [B,1,S,S] of 0/1 and "no_target" bool [B]; list fields (eval) are passed through. `non_blocking` overlaps the copy
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
    if "no_target" in batch:  # train batches: bool [B], gRefCOCO's no-target flag
        out["no_target"] = batch["no_target"].to(device, non_blocking=non_blocking)
    return out


# --------------------------------------------------------------------------------- network inputs


def _letterbox_input(url: str, key: str, jpeg: bytes, meta: dict, size: int):
    """refbench's input: scaled decode, antialiased letterbox -> (uint8 [3,S,S], Letterbox, None)."""
    rgb, box = _decode_image(url, key, jpeg, meta, size)
    return transforms.letterbox_uint8(rgb, box), box, None


def _cris_input(url: str, key: str, jpeg: bytes, meta: dict, size: int, normalise: bool = True):
    """CRIS's input (refbench.data.cvwarp): cv2 decode, cubic affine warp -> (float32 [3,S,S], Letterbox, CrisWarp);
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

# How the network input is made, by a protocol's `preprocess` (refbench.eval.metrics.Protocol).
EVAL_INPUTS = {"letterbox": _letterbox_input, "cris": _cris_input}
