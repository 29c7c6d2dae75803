"""The eval loader over prepared shards: every sentence of every ref of a split exactly once,
in a fixed order, cut across (rank, DataLoader worker) streams.

eval_loader (every sentence of every ref of a split exactly once, fixed order):
    this (rank, worker)'s run of the split's sentences (eval_plan; below shard granularity when
    there are more streams than shards)  ->  tar samples of its shards (the stream that ends a
    shard reads it whole and checks it)  ->  decode each image with a sentence in the run once,
    one item per sentence  ->  batches (custom collate)
    {"image": uint8[B,3,S,S] (float32 under CRIS's preprocessing), "content": int64[B,4],
     "tokens": int64[B,L], "swap_tokens": int64[B,L] and "has_swap": bool[B] (a sentence of
     another ref of the same image, for refbench.eval.sensitivity: `swap_tokens`),
     "gt": uint8[B,max H,max W] (the GT masks, zero-padded)} + lists:
    sent_id, ref_id, image_id, category_id, sent, height, width, letterbox, n_targets
    (transforms.Letterbox), warp (cvwarp.CrisWarp under CRIS's preprocessing, else None),
    gt_mask (uint8 [H,W], views of "gt")

Eval parallelism. `eval_plan` cuts a split's sentences, not its shards, so world x workers
streams all work however few shards a split has (RefCOCO val: 3 shards; at 16 GPUs 13 ranks
used to idle). On one H100, scoring EAVL rn101 in float32 at 480 is GPU-bound (~155
sentences/s on a one-shard split with 1, 8 or 16 workers alike): the gain is in the share of
the split each of many GPUs scores, which one lent GPU cannot show.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from refbench.data import transforms
from refbench.data.sources.grefer import n_targets
from refbench.data.shards import (
    EVAL_INPUTS,
    REPREPARE,
    Loader,
    Piece,
    _batch_tensor,
    _cut,
    _dataloader,
    _decode_mask,
    _failures_as_items,
    _parse_meta,
    _read_shard,
    _worker,
    load_manifest,
    split_shards,
)
from refbench.distributed import dist_info
from refbench.errors import RefbenchError


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
                                "gt_mask": gt, "n_targets": n_targets(ref),
                            }
                        i += 1
            else:  # read to the end: the shard holds what its manifest says
                if n != total:
                    raise RefbenchError(f"shard {url} is corrupt: it holds {n} sentences, the manifest says {total}",
                                        hint=REPREPARE)


def swap_tokens(refs: list[dict], r: int, j: int) -> list[int] | None:
    """The tokens of the sentence that stands in for sentence j of ref r when sentence
    sensitivity is measured (refbench.eval.sensitivity): one of another ref of the same image (the
    next ref, cyclically; its sentence j modulo its count), or None when the image has one ref
    (or the other refs have no sentences)."""
    for step in range(1, len(refs)):
        other = refs[(r + step) % len(refs)]["sentences"]
        if other:
            return other[j % len(other)]["tokens"]
    return None


EVAL_LISTS = ("sent_id", "ref_id", "image_id", "category_id", "sent", "height", "width", "letterbox", "warp", "gt_mask",
              "n_targets")  # n_targets: the ref's target count (gRefCOCO: 0 = no target; RefCOCO: 1)


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

    `preprocess` makes the network input: "letterbox" (refbench.data.transforms) or "cris" (CRIS's
    OpenCV chain, refbench.data.cvwarp; each item then also carries its `warp`, else None).

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
