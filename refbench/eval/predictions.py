"""`refbench predictions`: a refbench checkpoint's binarised masks, written as a submission.

    checkpoint -> model -> eval_stream.eval_loader (the protocol's preprocessing) -> sigmoid
    -> back to the original image and > threshold (evaluate.binary_masks: the protocol's own code)
    -> COCO RLE per sentence -> JSONL (gzip with .gz) in the order of `refbench sentences`

The file is exactly what `refbench score` reads (refbench.eval.score), so scoring it under the same
protocol gives the same per-sentence I and U as `refbench eval --protocol P` of the same
checkpoint: the masks come from the same function, and the scorer counts I and U exactly.
Protocols that compare at the network input (`input`) have no original-size masks and are
refused.

Under torchrun every rank predicts its own part of the split's sentences (eval_stream.eval_plan) and
rank 0 gathers the lines and writes the file (atomically).
"""

from __future__ import annotations

from pathlib import Path

from refbench.errors import RefbenchError


def export(checkpoint: Path, *, split: str, out: Path, dataset: str | None = None, shards: Path = Path("shards"),
           protocol: str = "original", batch_size: int = 16, workers: int | None = None) -> dict:
    """Predict every sentence of `split` and write the submission to `out` (rank 0).

    Returns {"path", "sentences", "dataset", "split", "threshold", "rank", "protocol", "per_rank" (the
    sentences each rank predicted)} on every rank; only rank 0 writes.
    """
    from refbench import checkpoint as ckpt_mod
    from refbench import remote
    from refbench.data import eval_stream
    from refbench.data import shards as data
    from refbench.distributed import all_gather_object, setup_distributed
    from refbench.eval import evaluate, metrics, score

    proto = score.check_protocol(protocol)
    d = setup_distributed()
    ckpt = ckpt_mod.load(checkpoint)
    net, dataset, dataset_dir, manifest = evaluate.load_scoring_inputs(ckpt, checkpoint, dataset, shards, d.device)
    if split not in manifest["splits"]:
        raise RefbenchError(f"split {split!r} is not in {remote.join(dataset_dir, 'manifest.json')}; splits: {', '.join(manifest['splits'])}")
    workers = 2 if workers is None else workers
    loader = eval_stream.eval_loader(dataset_dir, manifest, split=split, image_size=net.image_size, batch_size=batch_size,
                              workers=workers, rank=d.rank, world=d.world, preprocess=proto.preprocess)
    net.eval()
    lines: dict[int, str] = {}
    error = None  # a bad shard seen by one rank: raised on every rank after the gather
    try:
        for batch in loader:
            on_device = data.to_device(batch, d.device)  # uint8 images normalised on the device, as eval
            probs = evaluate.probabilities(net, on_device["image"], on_device["tokens"])  # float32, as eval
            for sid, mask in zip(batch["sent_id"], evaluate.binary_masks(probs, batch, net.threshold, protocol)):
                lines[int(sid)] = score.rle_line(sid, score.encode_mask(mask))
    except RefbenchError as e:
        if d.world == 1:
            raise
        error = (e.message, e.hint)
    gathered = all_gather_object(d, (lines, error))  # [(lines, error)] in a single process
    failed = [err for _, err in gathered if err is not None]
    if failed:
        raise RefbenchError(*failed[0])
    per_rank = [len(part) for part, _ in gathered]  # sentences each rank predicted
    lines = {k: v for part, _ in gathered for k, v in part.items()}
    info = {"path": out, "sentences": len(lines), "dataset": dataset, "split": split, "threshold": net.threshold,
            "rank": d.rank, "protocol": metrics.get_protocol(protocol).name, "per_rank": per_rank}
    if d.rank != 0:
        return info
    order = score.ground_truth(dataset_dir, manifest, split=split).sent_id
    missing = [sid for sid in order if sid not in lines]
    if missing or len(lines) != len(order):
        raise RefbenchError(
            f"predictions for {dataset}/{split}: {len(lines)} sentences predicted, the split has {len(order)}; "
            f"nothing written"
        )
    score.write_jsonl(out, (lines[sid] for sid in order))
    return info


def main(checkpoint: Path, split: str, dataset: str | None, shards: Path, out: Path, protocol: str, batch_size: int,
         workers: int | None) -> dict:
    """`refbench predictions`: export, then say what was written."""
    info = export(checkpoint, split=split, out=out, dataset=dataset, shards=shards, protocol=protocol,
                  batch_size=batch_size, workers=workers)
    if info["rank"] == 0:
        ranks = len(info["per_rank"])
        shares = f"; predicted by {ranks} ranks: {' + '.join(map(str, info['per_rank']))}" if ranks > 1 else ""
        print(f"{info['sentences']} masks of {info['dataset']}/{info['split']} (original image size, protocol "
              f"{info['protocol']}'s mapping, sigmoid > {info['threshold']:g}{shares}) written to {out}")
    return info
