"""The CUDA-only paths, end to end on tiny models and shards (`pytest -m gpu`; skipped without
CUDA, so they are no-ops on CPU-only CI). The whole set runs in about a minute on one H100.

- bf16 autocast training steps, then stop and resume (per-rank CUDA RNG state saved and restored);
- a checkpoint written with every visible GPU's RNG state (the format before per-rank states)
  or by more ranks resumes on one GPU, with a note instead of an IndexError;
- SyncBatchNorm: converted and trained in a single-process NCCL group;
- pinned host batches and non_blocking copies; persistent pinned loader workers across epochs
  and validations;
- evaluation on GPU runs in float32 and gives the CPU's I/U (tolerance below);
- `refbench predict` on the GPU gives the CPU's mask.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from _harness import DATASET, assert_cli_ok, cli, read_log, train_config

from refbench import checkpoint
from refbench.data import eval_stream
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.eval import evaluate
from refbench.train import loop as train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)


def _dist(device) -> train.Dist:
    return train.Dist(rank=0, world=1, local_rank=0, device=torch.device(device))


def test_bf16_training_steps_then_resume_restores_the_cuda_rng(shards_root, tmp_path):
    run = tmp_path / "run"
    train.train(train_config(shards_root, run, steps=4, amp="bf16", stop_after=2))
    ckpt = checkpoint.load(run / "last.pt")
    assert ckpt["rng"]["world"] == 1
    saved = ckpt["rng"]["ranks"][0]["cuda"]  # this rank's own device state, not every GPU's
    assert isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8
    train.train(train_config(shards_root, run, steps=4, amp="bf16", resume=True))
    log = read_log(run)
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and all(np.isfinite(losses))
    assert not [r for r in log if "note" in r]  # same world, same device: every state restored
    assert checkpoint.load(run / "last.pt")["step"] == 4


def test_resume_on_fewer_gpus_restores_this_devices_state_only():
    d = _dist(CUDA)
    torch.cuda.manual_seed(7)
    mine = torch.cuda.get_rng_state(CUDA)
    legacy = {**checkpoint.rng_state(), "cuda": [mine] + [torch.cuda.get_rng_state(CUDA)] * 7}  # "8 GPUs"
    torch.cuda.manual_seed(8)
    assert checkpoint.restore_rank_rng(legacy, d) is None
    assert torch.equal(torch.cuda.get_rng_state(CUDA), mine)
    two_ranks = {"world": 2, "ranks": [checkpoint.rng_state(CUDA)] * 2}
    assert "written by 2 rank(s), this run has 1" in checkpoint.restore_rank_rng(two_ranks, d)
    cpu_saved = {"world": 1, "ranks": [checkpoint.rng_state()]}  # a CPU run resumed on a GPU
    assert "CUDA" in checkpoint.restore_rank_rng(cpu_saved, d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_syncbatchnorm_trains_in_a_single_process_nccl_group():
    import dataclasses

    import torch.distributed as dist

    from refbench import models
    from refbench.train import recipes

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=CUDA)
    try:
        d = train.Dist(rank=0, world=2, local_rank=0, device=CUDA)  # the decision as for 2 ranks
        torch.manual_seed(0)
        net = train.sync_batchnorm(models.build("eavl", "tiny").to(CUDA), d,
                                   dataclasses.replace(recipes.get_recipe("tiny"), sync_bn=True))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0])
        size = net.image_size
        image = torch.randn(4, 3, size, size, device=CUDA)
        tokens = torch.randint(1, 400, (4, 17), device=CUDA)
        tokens[:, -1] = 49407
        mask = (torch.rand(4, 1, size, size, device=CUDA) > 0.5).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net.loss(ddp(image, tokens), mask)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_pinned_batches_and_non_blocking_copies(shards_root):
    loader = train_stream.train_loader(shards_root / DATASET, batch_size=4, image_size=96, workers=2, pin_memory=True,
                               num_batches=2)
    for batch in loader:
        assert batch["image"].is_pinned() and batch["mask"].is_pinned()
        on_gpu = batch["image"].to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch["image"])
    ev = eval_stream.eval_loader(shards_root / DATASET, split="val", image_size=96, batch_size=4, workers=1, pin_memory=True)
    assert next(iter(ev))["image"].is_pinned()


def test_persistent_pinned_workers_across_epochs_and_validations(shards_root):
    """Persistent workers with pinned memory (torch's pin thread and its exit hook): one
    TrainLoader serves two epochs from the same processes, pinned, each epoch's batches those
    of a fresh loader; a persistent eval loader read twice, pinned, the same batches."""
    ds = shards_root / DATASET
    kw = dict(batch_size=4, image_size=96, workers=2, pin_memory=True, num_batches=3)
    with train_stream.TrainLoader(ds, **kw) as run:
        pids = []
        for epoch in (0, 1):
            fresh = list(train_stream.train_loader(ds, epoch=epoch, **kw))
            got = list(run.epoch(epoch))
            assert all(b["image"].is_pinned() for b in got)
            assert all(torch.equal(x["sent_id"], y["sent_id"]) and torch.equal(x["image"], y["image"])
                       for x, y in zip(got, fresh)) and len(got) == len(fresh) == 3
            pids.append([w.pid for w in run.dataloader._iterator._workers])
        assert pids[0] == pids[1]
    ev = eval_stream.eval_loader(ds, split="val", image_size=96, batch_size=4, workers=2, pin_memory=True, persistent=True)
    first, second = list(ev), list(ev)
    assert [b["sent_id"] for b in first] == [b["sent_id"] for b in second] and first[0]["image"].is_pinned()
    ev.close()


def test_gpu_evaluation_is_float32_and_gives_the_cpu_iu(init_run, shards_root):
    """Tolerance: the two runs differ only in float32 rounding (summation order of GPU kernels;
    TF32 is off while scoring), about 1e-6 relative on a logit, so only pixels whose probability
    lies within ~1e-6 of the 0.35 threshold can flip: a few pixels in a split, never a sentence's
    worth. We allow 0.1% of the summed union in |dI| + |dU| and 1e-3 in mIoU; bf16 scoring (7
    mantissa bits, the old GPU default) flips far more."""
    from refbench.eval import metrics

    ckpt = checkpoint.load(init_run / "best.pt")
    manifest = data.load_manifest(shards_root / DATASET)
    scores = {}
    for device in ("cpu", "cuda"):
        net = checkpoint.build_model(ckpt).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in a bf16 training run's validation
            s = evaluate.score_split(net, shards_root / DATASET, manifest, "val", _dist(device), batch_size=8)
        scores[device] = s.columns
    a, b = scores["cpu"], scores["cuda"]
    assert a["sent_id"] == b["sent_id"]
    diff = sum(abs(x - y) for x, y in zip(a["I"], b["I"])) + sum(abs(x - y) for x, y in zip(a["U"], b["U"]))
    assert diff <= 1e-3 * sum(a["U"]), diff
    ma, mb = metrics.summarize(a["I"], a["U"]), metrics.summarize(b["I"], b["U"])
    assert abs(ma["mIoU"] - mb["mIoU"]) < 1e-3


def test_predict_on_gpu_gives_the_cpu_mask(init_run, synth_root, tmp_path, monkeypatch):
    from PIL import Image

    from refbench.eval import visualize

    image = sorted((synth_root / "images" / "train2014").glob("*.jpg"))[0]
    masks = {}
    for device in ("cuda", "cpu"):
        if device == "cpu":
            monkeypatch.setattr(visualize, "predict_device", lambda: torch.device("cpu"))
        out = tmp_path / device / "mask.png"
        result = cli("predict", "--checkpoint", init_run / "best.pt", "--image", image, "--text", "the red circle",
                     "--out", out)
        assert_cli_ok(result)
        assert f"float32 on {device}" in result.stdout
        masks[device] = np.asarray(Image.open(out)) > 0
    assert masks["cuda"].any()
    assert (masks["cuda"] != masks["cpu"]).mean() < 1e-3  # threshold flips from float32 rounding only
