"""The data stage: raw refer files -> prepared webdataset shards -> batches.

    datasets        the dataset table: PARTITIONS, prepared-folder names, the shard schema tag
    sources/        raw sources: refer (the refer toolkit's files, safe pickle loader, masks),
                    hf (the Hugging Face parquet mirrors), grefer (gRefCOCO's grefs + instances)
    synth/          `refbench synth`: the embedded synthetic dataset (generate; scene, language, render;
                    gref: its gRefCOCO)
    text            CLIP tokenisation (17 tokens for RefCOCO/+, 22 for G-Ref)
    prepare         raw -> shards, the writer (`refbench prepare`); shard_writer: one shard's tar
    shards          shards -> checked samples: the manifest, tar streams, decoding, the network input
    train_stream    the training stream (seeded epoch plans, resumable)
    eval_stream     the eval loader (every sentence once, fixed order)
    transforms      letterbox and normalisation; cvwarp: CRIS's OpenCV warp

Imports only the root modules (errors, fsutil, progress, distributed, remote) and refbench.models.
"""

from __future__ import annotations

from refbench import lazy_exports

_EXPORTS = {  # public name -> the module of this package that defines it
    "REPREPARE": "shards",
    "load_manifest": "shards",
    "split_shards": "shards",
    "verify_shards": "shards",
    "steps_per_epoch": "shards",
    "split_samples": "shards",
    "split_images": "shards",
    "to_device": "shards",
    "Loader": "shards",
    "Piece": "shards",
    "EVAL_INPUTS": "shards",
    "train_loader": "train_stream",
    "TrainLoader": "train_stream",
    "epoch_plan": "train_stream",
    "eval_loader": "eval_stream",
    "eval_plan": "eval_stream",
    "collate_eval": "eval_stream",
    "pad_stack": "eval_stream",
    "swap_tokens": "eval_stream",
    "EVAL_LISTS": "eval_stream",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
