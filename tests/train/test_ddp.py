"""Every registered model and every ablation configuration trains under DDP (2 ranks, gloo, CPU).

DDP without `find_unused_parameters` fails on the second step ("Expected to have finished
reduction in the prior iteration") when any trainable parameter gets no gradient, e.g. an F_vg
projection that a model never reads. Two checks: in one process, every trainable parameter of
every configuration receives a gradient; and two gloo ranks run three DDP steps of each
configuration and end with identical weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from _model_helpers import make_tokens

from refbench import models


def ddp_configs() -> list[tuple[str, str, dict]]:
    """(model, variant, config overrides): every registered model's tiny variants, and the tiny
    EAVL of every distinct ablation run (refbench ablate's Tables 2-4)."""
    from refbench.ablate import run as ablate

    configs = [(name, variant, {}) for name in models.names() for variant in models.get_spec(name).variants
               if variant.startswith("tiny")]
    for run in ablate.plan_runs(ablate.AblationConfig(workdir=Path("unused"))):
        configs.append(("eavl", "tiny", run.setting.overrides()))
    return configs


CONFIGS = ddp_configs()
IDS = [f"{n}-{v}-" + "-".join(f"{k}={o[k]}" for k in sorted(o)) if o else f"{n}-{v}" for n, v, o in CONFIGS]


def _batch(model, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    image = torch.randn(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return image, make_tokens(batch, 17, seed=seed), mask


@pytest.mark.parametrize("name,variant,overrides", CONFIGS, ids=IDS)
def test_every_trainable_parameter_gets_a_gradient(name, variant, overrides, one_torch_thread):
    torch.manual_seed(0)
    model = models.build(name, variant, **overrides).train()
    image, tokens, mask = _batch(model, 0)
    model.loss(model(image, tokens), mask)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}/{variant} {overrides}: no gradient reaches {missing}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, configs: list, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    try:
        for name, variant, overrides in configs:
            torch.manual_seed(0)  # the same init on every rank
            net = models.build(name, variant, **overrides).train()
            ddp = DistributedDataParallel(net)  # find_unused_parameters=False, as refbench train
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            for step in range(3):  # the unused-parameter error shows on the second step
                image, tokens, mask = _batch(net, seed=100 * step + rank)  # different data per rank
                opt.zero_grad(set_to_none=True)
                net.loss(ddp(image, tokens), mask)["loss"].backward()
                opt.step()
            checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
            sums = [torch.zeros_like(checksum) for _ in range(world)]
            dist.all_gather(sums, checksum)
            results.append(float(sums[0]) == float(sums[1]))
    except Exception as e:  # reported through the file, so the parent shows the config that failed
        results.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(results))


def test_every_model_and_ablation_trains_under_two_rank_gloo_ddp(tmp_path):
    import ast

    import torch.multiprocessing as mp

    out = tmp_path / "results.txt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, _free_port(), CONFIGS, str(out)), nprocs=2, join=True)
    results = ast.literal_eval(out.read_text())
    failed = {IDS[i]: r for i, r in enumerate(results) if r is not True}
    assert len(results) == len(CONFIGS) and not failed, failed


# ------------------------------------------------------------------------------ rank-0 decisions (2 gloo ranks)


def _decisions_worker(rank: int, world: int, port: int, run: str, out: str) -> None:
    import torch.distributed as dist

    from refbench import checkpoint
    from refbench.errors import RefbenchError
    from refbench.train import config
    from refbench.train import loop as train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    d = train.Dist(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    seen: dict = {}

    def outcome(fn):
        try:
            return fn()
        except RefbenchError as e:
            return f"RefbenchError: {e.message}"

    # a checkpoint-like object with tensors, nested, from rank 0 only
    obj = {"w": torch.arange(6.0).reshape(2, 3), "opt": [{"m": torch.ones(2, dtype=torch.bfloat16)}, 3], "s": "x"}
    got = checkpoint.broadcast_from_rank0(obj if rank == 0 else None, d)
    seen["broadcast"] = (torch.equal(got["w"], obj["w"]) and got["opt"][0]["m"].dtype == torch.bfloat16
                         and got["opt"][1] == 3 and got["s"] == "x")

    # only rank 0 reads the run folder: on rank 1 checkpoint.load refuses (as on a node without --out)
    if rank == 1:
        checkpoint.load = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rank 1 read the checkpoint"))
    from refbench.train.recipes import get_recipe

    cfg = config.TrainConfig(model="eavl", variant="tiny", dataset="refcoco_unc", shards=Path(run),
                            recipe=get_recipe("tiny"), out=Path(run), resume=True)
    seen["resume"] = outcome(lambda: train._start_checkpoint(cfg, d, Path(run) / "last.pt")["step"])
    cfg.resume = False
    seen["exists"] = outcome(lambda: train._start_checkpoint(cfg, d, Path(run) / "last.pt"))

    # a non-finite loss on rank 1 only: every rank raises, naming the first bad step
    health = train._LossHealth(d)
    for step in (1, 2, 3):
        bad = rank == 1 and step >= 2
        health.add(torch.tensor(float("nan") if bad else 1.0), step)
    seen["finite"] = outcome(lambda: health.check(3))

    # CLIP weights: the node's first rank builds (downloads) first, the others after it, from its
    # cache; a failure there is raised on every rank
    import time

    from refbench import models as models_mod

    built = []

    def build(*args, **kw):
        if kw.get("pretrained") == "broken":
            raise models_mod.ModelError("weights RN50/broken cannot be downloaded")
        if rank == 0:
            time.sleep(0.5)  # a slow download
        built.append(time.time())
        return "net"

    models_mod.build = build
    cfg.recipe = type("R", (), {"pretrained": "openai", "image_size": None})()
    seen["built"] = (train._build_model(cfg, d), built[0])
    cfg.recipe.pretrained = "broken"
    seen["build_error"] = outcome(lambda: train._build_model(cfg, d))

    # each rank its own dropout stream, and its own RNG states in a checkpoint
    train._seed_rank(0, d)
    seen["dropout"] = torch.nn.functional.dropout(torch.ones(64), 0.5).tolist()
    states = checkpoint.rank_rng_states(d)
    expected = torch.rand(4).tolist()
    torch.manual_seed(12345)
    seen["rng_note"] = checkpoint.restore_rank_rng(states, d)
    seen["rng_restored"] = torch.rand(4).tolist() == expected
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(seen))


def test_rank0_decides_and_every_rank_follows(tmp_path):
    """Two gloo ranks: rank 0 alone reads last.pt and sends it; 'a run already exists' and a
    non-finite loss on one rank raise on every rank (no rank left waiting in a collective); the
    first local rank builds (downloads the weights) before the others, and its failure stops
    every rank; dropout differs across ranks; each rank gets its own RNG states back."""
    import ast
    import dataclasses

    import torch.multiprocessing as mp

    from refbench import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = models.build("blind", "tiny")
    # the model config and recipe a tiny eavl run records, so the resume check lets it continue
    from refbench.train.config import TrainConfig, model_overrides
    from refbench.train.recipes import get_recipe

    rec = get_recipe("tiny")
    like = TrainConfig(model="eavl", variant="tiny", dataset="refcoco_unc", shards=run, recipe=rec, out=run)
    config = models.make_config("eavl", "tiny", **model_overrides(like))
    checkpoint.save(run / "last.pt", {"model": {"name": "eavl", "variant": "tiny", "config": dataclasses.asdict(config)},
                                      "state_dict": net.state_dict(), "optimizer": {"state": {}}, "step": 7,
                                      "dataset": {"name": "refcoco_unc"}, "recipe": dataclasses.asdict(rec)})
    out = tmp_path / "seen"
    mp.spawn(_decisions_worker, args=(2, _free_port(), str(run), str(out)), nprocs=2, join=True)
    seen = [ast.literal_eval(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    for s in seen:
        assert s["broadcast"] and s["resume"] == 7
        assert s["exists"].startswith("RefbenchError") and "a run already exists here" in s["exists"]
        assert s["finite"] == "RefbenchError: the training loss became non-finite (nan or inf) at step 2"
        assert s["rng_note"] is None and s["rng_restored"]
    assert seen[0]["dropout"] != seen[1]["dropout"]
    assert seen[0]["built"][0] == seen[1]["built"][0] == "net"
    assert seen[1]["built"][1] >= seen[0]["built"][1]  # rank 1 (local rank 1) built after rank 0 had finished
    for s in seen:
        assert s["build_error"] == "RefbenchError: weights RN50/broken cannot be downloaded"


def test_rng_states_of_another_world_size_are_not_restored():
    from refbench import checkpoint
    from refbench.train import loop as train

    d1 = train.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    d2 = train.Dist(rank=1, world=2, local_rank=1, device=torch.device("cpu"))
    states = checkpoint.rank_rng_states(d1)
    assert states["world"] == 1 and len(states["ranks"]) == 1 and "cuda" not in states["ranks"][0]
    note = checkpoint.restore_rank_rng(states, d2)
    assert "written by 1 rank(s), this run has 2" in note
    # a checkpoint from before per-rank states: one dict, CUDA states of every visible GPU
    legacy = {**checkpoint.rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    expected = torch.rand(3)
    torch.manual_seed(99)
    assert "CUDA" in checkpoint.restore_rank_rng(legacy, d1)  # on a CPU: torch and python restored, CUDA said
    assert torch.equal(torch.rand(3), expected)
    assert train.rank_seed(0, 0) != train.rank_seed(0, 1) != train.rank_seed(0, 1, step=5)


def test_syncbatchnorm_on_cuda_with_several_ranks_only():
    """The decision (the conversion runs on any device; SyncBatchNorm's forward needs CUDA)."""
    import dataclasses

    from refbench.train import loop as train
    from refbench.train import recipes

    rec = recipes.get_recipe("paper")
    torch.manual_seed(0)
    cases = {("cuda", 2, True): True, ("cuda", 1, True): False, ("cpu", 2, True): False, ("cuda", 2, False): False}
    for (device, world, sync_bn), converted in cases.items():
        net = models.build("eavl", "tiny")
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # CLIP ResNet's BN
        d = train.Dist(rank=0, world=world, local_rank=0, device=torch.device(device))
        out = train.sync_batchnorm(net, d, dataclasses.replace(rec, sync_bn=sync_bn))
        kinds = {type(m) for m in out.modules()}
        assert (torch.nn.SyncBatchNorm in kinds) is converted and (torch.nn.BatchNorm2d not in kinds) is converted
        assert out.model_name == "eavl" and out.state_dict().keys() == net.state_dict().keys()


def test_fp16_resume_of_a_bf16_run_starts_the_scaler_afresh():
    from refbench.train import loop as train

    bf16_state = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # what a bf16 run saves: {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert "scaler starts afresh" in train._load_scaler(scaler, bf16_state, "fp16")
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    assert train._load_scaler(scaler, fp16.state_dict(), "fp16") is None and scaler.get_scale() == 1024.0
    assert train._load_scaler(torch.amp.GradScaler("cpu", enabled=False), fp16.state_dict(), "bf16") is None


class _Probe(torch.nn.Module):
    """Records the dtype its forward computes in."""

    threshold, image_size = 0.35, 32

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.seen = []

    def forward(self, image, tokens):
        out = self.conv(image)
        self.seen.append(out.dtype)
        return {"logits": out}


def test_scoring_runs_in_float32_under_a_bf16_autocast():
    from refbench.eval import evaluate

    probe = _Probe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = evaluate.probabilities(probe, torch.randn(2, 3, 32, 32), torch.zeros(2, 17, dtype=torch.long))
    assert probe.seen == [torch.float32] and probs.dtype == torch.float32
    assert evaluate.EVAL_PRECISION == "float32"


def test_predict_uses_the_gpu_when_there_is_one(monkeypatch):
    from refbench.eval import visualize

    assert visualize.predict_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert visualize.predict_device() == torch.device("cuda", 0)


# ------------------------------------------------------------------------------ eval below shard granularity (2 gloo ranks)


class _Scorer(torch.nn.Module):
    """A small deterministic segmenter for the scoring tests (no CLIP import in every rank): a
    quarter-resolution map from the image, shifted by the sentence's tokens."""

    threshold, image_size = 0.35, 96

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, stride=4, padding=1)
        self.words = torch.nn.Embedding(49408, 1)

    def forward(self, image, tokens):
        return {"logits": self.conv(image) + self.words(tokens).mean(1)[:, :, None, None]}


def _eval_worker(rank: int, world: int, port: int, ds: str, bad: str, out: str) -> None:
    import multiprocessing

    import torch.distributed as dist

    from refbench.data import eval_stream
    from refbench.data import shards as data
    from refbench.errors import RefbenchError
    from refbench.eval import evaluate
    from refbench.train import loop as train

    multiprocessing.set_start_method("fork", force=True)  # DataLoader workers as under torchrun (mp.spawn set "spawn")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    d = train.Dist(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    net = _Scorer()
    manifest = data.load_manifest(ds)
    seen: dict = {}
    # 2 ranks x 2 DataLoader workers on a split of one shard: 4 streams, each its own run of sentences
    own = eval_stream.eval_loader(ds, manifest, split="val", image_size=net.image_size, batch_size=1, workers=2, rank=rank, world=world)
    seen["own"] = (own.sentences, own.workers)
    scores = evaluate.score_split(net, ds, manifest, "val", d, batch_size=1, workers=2)
    seen["columns"] = scores.columns
    # the shard damaged at its end: only the rank reading to the end sees it, every rank raises it
    try:
        evaluate.score_split(net, bad, data.load_manifest(bad), "val", d, batch_size=1, workers=0)
        seen["bad"] = None
    except RefbenchError as e:
        seen["bad"] = e.message
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(seen))


def test_two_rank_eval_of_a_one_shard_split_is_the_single_process_eval(tmp_path):
    """A val split of ONE shard scored by 2 gloo ranks x 2 workers: both ranks score sentences
    (the split is cut below shard granularity), the gathered per-sentence I/U equal the
    single-process eval's (batch 1: a forward's rounding depends on its batch mates); a shard
    damaged where only rank 1 reads raises the same error on both ranks (none hangs)."""
    import ast
    import shutil

    import torch.multiprocessing as mp
    from _tiny_shards import write_tiny_dataset

    from refbench.data import shards as data
    from refbench.eval import evaluate
    from refbench.train import loop as train

    ds, truth = write_tiny_dataset(tmp_path / "good", images={"train": 2, "val": 6}, shard_size=6)
    assert data.load_manifest(ds)["splits"]["val"]["shards"] == 1
    bad = tmp_path / "bad" / ds.name
    shutil.copytree(ds, bad)
    shard = bad / "val" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # the end-of-archive blocks: only the last reader gets there

    d = train.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    single = evaluate.score_split(_Scorer(), ds, data.load_manifest(ds), "val", d, batch_size=1, workers=0).columns
    assert single["sent_id"] == truth.sentences["val"]
    assert 0 < sum(single["I"]) < sum(single["U"]) and len(set(zip(single["I"], single["U"]))) > 5  # informative I/U

    out = tmp_path / "seen"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_eval_worker, args=(2, _free_port(), str(ds), str(bad), str(out)), nprocs=2, join=True)
    seen = [ast.literal_eval(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    n = len(truth.sentences["val"])
    assert [s["own"] for s in seen] == [(n // 2, 2), (n - n // 2, 2)]  # both ranks, all 4 streams, score
    for s in seen:
        by_sentence = {k: dict(zip(s["columns"]["sent_id"], s["columns"][k])) for k in s["columns"]}
        assert sorted(s["columns"]["sent_id"]) == sorted(single["sent_id"])  # every sentence exactly once
        for k, values in single.items():
            assert [by_sentence[k][sid] for sid in single["sent_id"]] == values, k
        assert s["bad"] and "val-000000.tar" in s["bad"] and "corrupt" in s["bad"]
    assert seen[0]["bad"] == seen[1]["bad"]
