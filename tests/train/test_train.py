"""`refbench train`: a short tiny-EAVL run learns and leaves checkpoints `refbench eval`
loads; stop + `--resume` is bitwise an uninterrupted run (DataLoader workers 0 and 2); 2-rank
torchrun on CPU (gloo) keeps the ranks identical on disjoint shards; clear one-line errors;
`--set FIELD=VALUE` reaches the model config.

Runs are tiny (batch 4, a few steps, one torch thread: see tests/_harness.py) on the synthetic
shards of tests/conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _harness import (
    DATASET,
    assert_cli_ok,
    assert_ok,
    assert_one_line_error,
    cli,
    read_log,
    torchrun,
    train_config,
    train_losses,
)
from conftest import TINY_RUN_STEPS

from refbench import checkpoint, models
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.errors import RefbenchError
from refbench.eval import results
from refbench.train.loop import train
from refbench.train.recipes import get_lr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fixed_batch_loss(net, shards_root: Path) -> float:
    """The loss of `net` on one fixed batch of 8 train refs (seed 123), in eval mode."""
    batch = next(iter(train_stream.train_loader(shards_root / DATASET, batch_size=8, image_size=net.image_size, seed=123,
                                        num_batches=1)))
    batch = data.to_device(batch, "cpu")
    net.eval()
    with torch.no_grad():
        return float(net.loss(net(batch["image"], batch["tokens"]), batch["mask"])["loss"])


def test_short_run_lowers_the_loss_and_eval_loads_its_checkpoints(tiny_run, shards_root, tmp_path):
    from refbench import models

    losses = [loss for _, (_, loss) in sorted(train_losses(tiny_run).items())]
    assert len(losses) == TINY_RUN_STEPS
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    # 8 steps of batch 4: the curve depends on the data order (the epoch plan), so the bar is a
    # clear fall (at least a third), not a tuned factor; the fixed-batch loss below is the sharp check
    assert last < 0.67 * first, losses

    # the same init as the run (seed 0 before building) against the trained weights, on a fixed batch
    torch.manual_seed(0)
    init = models.build("eavl", "tiny", pretrained=None)
    ckpt = checkpoint.load(tiny_run / "last.pt")
    trained = checkpoint.build_model(ckpt)
    assert ckpt["step"] == TINY_RUN_STEPS and ckpt["model"]["name"] == "eavl"
    assert _fixed_batch_loss(trained, shards_root) < 0.5 * _fixed_batch_loss(init, shards_root)

    for name in ("best.pt", "last.pt"):
        res = tmp_path / name
        result = cli("eval", "--checkpoint", tiny_run / name, "--shards", shards_root, "--split", "val",
                     "--results", res, "--workers", "0")
        assert_cli_ok(result)
        (path,) = (res / DATASET / "val").glob("*.json")
        record = results.load_record(path)
        assert record.metrics["n"] == data.load_manifest(shards_root / DATASET)["splits"]["val"]["sentences"]
        assert record.model["name"] == "eavl" and record.model["step"] == TINY_RUN_STEPS


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_is_bitwise_an_uninterrupted_run(shards_root, tmp_path, workers):
    steps, k = 5, 3  # stop mid-epoch after an odd number of steps (with 2 workers: a worker's turn mid-round)
    full = train(train_config(shards_root, tmp_path / "full", steps=steps, workers=workers))
    part = tmp_path / "part"
    train(train_config(shards_root, part, steps=steps, workers=workers, stop_after=k))
    stopped = checkpoint.load(part / "last.pt")
    assert (stopped["step"], stopped["epoch"], stopped["step_in_epoch"]) == (k, 0, k)
    train(train_config(shards_root, part, steps=steps, workers=workers, resume=True))

    a, b = checkpoint.load(full / "last.pt"), checkpoint.load(part / "last.pt")
    assert a["step"] == b["step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[key], pb[key]) for key in pa)

    log_full, log_part = train_losses(full), train_losses(part)
    assert sorted(log_part) == sorted(log_full) == list(range(1, steps + 1))  # no step lost or repeated
    assert log_part == log_full  # the same lr and the same loss at every step
    rec = a["recipe"]
    assert [log_full[s][0] for s in range(1, steps + 1)] == [
        get_lr(s, steps, rec["lr"], rec["warmup_steps"], rec["lr_power"], rec["min_lr"]) for s in range(steps)]


def test_workers_live_across_epochs_and_validations_and_resume_is_bitwise(tmp_path, monkeypatch):
    """A run of 3 epochs with a validation at the end of each and 2 DataLoader workers starts
    worker processes twice (the train stream once, the val loader once), not once per epoch and
    per validation (tests/data/test_data.py: each epoch's batches are still that epoch's); stopped
    inside the second epoch and resumed, it ends bitwise as the uninterrupted run."""
    from _tiny_shards import write_tiny_dataset
    from torch.utils.data import dataloader as torch_dataloader

    shards = tmp_path / "shards"
    write_tiny_dataset(shards, images={"train": 4, "val": 2})
    manifest = data.load_manifest(shards / DATASET)
    steps_per_epoch = data.steps_per_epoch(manifest, "train", 4)
    assert steps_per_epoch == 2  # (the tiny set's 7 train refs at batch 4)
    steps = 3 * steps_per_epoch

    starts = []  # DataLoader iterators that start worker processes
    real_init = torch_dataloader._MultiProcessingDataLoaderIter.__init__

    def counting_init(self, loader):
        starts.append(type(loader.dataset).__name__)
        real_init(self, loader)

    monkeypatch.setattr(torch_dataloader._MultiProcessingDataLoaderIter, "__init__", counting_init)
    full = train(train_config(shards, tmp_path / "full", steps=steps, workers=2))
    assert sorted(starts) == ["_EvalStream", "_TrainStream"]
    log = read_log(full)
    assert [r["epoch"] for r in log if "val" in r] == [0, 1, 2]  # a validation per epoch

    part = tmp_path / "part"
    train(train_config(shards, part, steps=steps, workers=2, stop_after=3))
    stopped = checkpoint.load(part / "last.pt")
    assert (stopped["step"], stopped["epoch"], stopped["step_in_epoch"]) == (3, 1, 1)
    train(train_config(shards, part, steps=steps, workers=2, resume=True))
    a, b = checkpoint.load(full / "last.pt"), checkpoint.load(part / "last.pt")
    assert a["step"] == b["step"] == steps
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert train_losses(part) == train_losses(full)


def test_the_progress_bar_keeps_the_last_throughput_across_logs_and_validations(shards_root, tmp_path, monkeypatch):
    """The log and a validation each open a new throughput window; the bar shows the last rate
    measured, never the 0.0 of a window that has no samples yet (every step is logged here)."""
    from refbench.progress import TrainProgress

    shown = []
    monkeypatch.setattr(TrainProgress, "update", lambda self, step, **fields: shown.append(fields["samples_per_s"]))
    train(train_config(shards_root, tmp_path / "run", steps=4, val_every=2))
    assert len(shown) == 4 and all(rate > 0 for rate in shown), shown


@pytest.mark.parametrize("model", ["eavl", pytest.param("blind", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_on_cpu(small_shards_root, tmp_path, model):
    out = tmp_path / "ddp"
    args = ("train", model, "--recipe", "tiny", "--steps", "3", "--batch-size", "8", "--workers", "0",
            "--shards", small_shards_root, "--out", out)
    proc = torchrun(2, *args, "--amp", "bf16")  # bf16 autocast training (CPU), float32 validation
    assert_ok(proc)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "log.jsonl"]
    ckpt = checkpoint.load(out / "last.pt")
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # the model's weights, not DDP's
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [3]  # one log (rank 0's); the tiny recipe logs every 10 steps and the last
    (end,) = [r for r in log if r.get("event") == "end"]
    assert len(end["param_checksums"]) == 2 and end["ranks_agree"]
    assert end["param_checksums"][0] == end["param_checksums"][1]
    assert [r["val_precision"] for r in log if "val" in r] == ["float32"]
    ranks = [{(url, i) for url, a, b in pieces for i in range(a, b)} for pieces in end["train_pieces"]]
    manifest = data.load_manifest(small_shards_root / DATASET)
    every = {(s["url"], i) for s in data.split_shards(manifest, small_shards_root / DATASET, "train")
             for i in range(s["samples"])}
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1] and ranks[0] | ranks[1] == every  # images

    # rank 0 decides: both ranks stop with the one error line (none waits in a collective)
    again = torchrun(2, *args, timeout=300)
    assert again.returncode != 0
    assert again.stderr.count("a run already exists here") >= 2


def _ref_ids_in(shard_urls: list[str]) -> set[int]:
    import tarfile

    ids = set()
    for url in shard_urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    ids.update(r["ref_id"] for r in json.loads(tar.extractfile(m).read())["refs"])
    return ids


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_draw_disjoint_train_data(small_shards_root, workers):
    ds = small_shards_root / DATASET
    seen, shards = [], []
    for rank in (0, 1):
        loader = train_stream.train_loader(ds, batch_size=4, image_size=32, rank=rank, world=2, workers=workers, seed=5)
        shards.append(loader.shards)
        seen.append({int(i) for b in loader for i in b["ref_id"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    for rank in (0, 1):
        assert seen[rank] <= _ref_ids_in(shards[rank])


def test_fewer_train_images_than_ranks_is_refused(shards_root):
    n = data.load_manifest(shards_root / DATASET)["splits"]["train"]["images"]
    with pytest.raises(RefbenchError) as e:
        train_stream.train_loader(shards_root / DATASET, batch_size=2, rank=0, world=n + 1)
    assert f"{n} image(s), fewer than the {n + 1} ranks" in e.value.message and "fewer ranks" in e.value.hint


def test_missing_shards_name_the_prepare_command(tmp_path):
    result = cli("train", "eavl", "--recipe", "tiny", "--shards", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_line_error(result, f"{DATASET} is not prepared",
                          f"refbench prepare --dataset refcoco --split-by unc --data data --out {tmp_path / 'nowhere'}")
    assert not (tmp_path / "run").exists()


def test_unknown_model_lists_the_registry(shards_root, tmp_path):
    result = cli("train", "segformer", "--recipe", "tiny", "--shards", shards_root, "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown model 'segformer'", "blind, cris, eavl")


def test_resuming_another_models_checkpoint_is_refused(tiny_run, shards_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "last.pt", run / "last.pt")
    before = (run / "last.pt").read_bytes()
    result = cli("train", "cris", "--recipe", "tiny", "--shards", shards_root, "--out", run, "--resume")
    assert_one_line_error(result, f"{run / 'last.pt'}: checkpoint is for eavl/tiny on {DATASET}, not cris/tiny")
    assert (run / "last.pt").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_a_second_run_into_the_same_folder_is_refused(tiny_run, shards_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = cli("train", "eavl", "--recipe", "tiny", "--shards", shards_root, "--out", run)
    assert_one_line_error(result, "a run already exists here", "--resume")


def test_set_overrides_reach_the_model_config(shards_root, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "eavl", "--recipe", "tiny", "--steps", "1", "--batch-size", "4", "--workers", "0",
                 "--shards", shards_root, "--out", run, "--set", "num_queries=2", "--set", "aligner=fixed")
    assert_cli_ok(result)
    ckpt = checkpoint.load(run / "last.pt")
    assert ckpt["model"]["config"]["num_queries"] == 2 and ckpt["model"]["config"]["aligner"] == "fixed"
    net = checkpoint.build_model(ckpt)  # the weights fit a model built from the recorded config
    assert net.config.num_queries == 2 and net.config.aligner == "fixed"
    assert json.loads((run / "config.json").read_text())["overrides"] == {"num_queries": 2, "aligner": "fixed"}

    result = cli("train", "eavl", "--recipe", "tiny", "--shards", shards_root, "--out", tmp_path / "bad",
                 "--set", "num_querys=2")
    assert_one_line_error(result, "model 'eavl' has no config field(s) num_querys")


# ------------------------------------------------------------------------------ run state


def test_run_state_new_resume_done_stale(tiny_run, shards_root, tmp_path, monkeypatch):
    from refbench.train.runs import run_state

    cfg = train_config(shards_root, tmp_path / "run", steps=TINY_RUN_STEPS)
    new = run_state(cfg)
    assert (new.state, new.step) == ("new", None) and "no last.pt" in new.reason

    shutil.copytree(tiny_run, cfg.out)
    done = run_state(cfg)
    assert (done.state, done.step) == ("done", TINY_RUN_STEPS) and str(cfg.out) in done.reason
    # a model config field left to the build (None, e.g. quick_gelu decided from the weights) matches
    # whatever the checkpoint recorded as built; a value asked for explicitly must match
    recorded = checkpoint.load(tiny_run / "last.pt")["model"]["config"]
    assert recorded["quick_gelu"] is not None
    real_make_config = models.make_config

    def leaves_quick_gelu_to_the_build(*args, **kwargs):
        config = real_make_config(*args, **kwargs)
        config.quick_gelu = None
        return config

    monkeypatch.setattr(models, "make_config", leaves_quick_gelu_to_the_build)
    assert run_state(cfg).state == "done"
    monkeypatch.setattr(models, "make_config", real_make_config)
    asked = run_state(train_config(shards_root, cfg.out, steps=TINY_RUN_STEPS,
                                   model_overrides={"quick_gelu": not recorded["quick_gelu"]}))
    assert asked.state == "stale" and "another model config" in asked.reason

    ckpt = checkpoint.load(tiny_run / "last.pt")
    checkpoint.save(cfg.out / "last.pt", {**ckpt, "step": 3})  # as if killed at step 3
    resume = run_state(cfg)
    assert (resume.state, resume.step) == ("resume", 3) and f"step 3 of {TINY_RUN_STEPS}" in resume.reason

    for changed, why in [(train_config(shards_root, cfg.out, steps=TINY_RUN_STEPS, seed=1), "seed"),
                         (train_config(shards_root, cfg.out, steps=TINY_RUN_STEPS, lr=1e-2), "recipe lr"),
                         (train_config(shards_root, cfg.out, steps=TINY_RUN_STEPS, model_overrides={"num_queries": 2}),
                          "model config"),
                         (train_config(shards_root, cfg.out, model="cris", steps=TINY_RUN_STEPS), "model")]:
        stale = run_state(changed)
        assert stale.state == "stale" and f"another {why}" in stale.reason, stale
    checkpoint.save(cfg.out / "last.pt", ckpt)
    (cfg.out / "best.pt").unlink()
    assert "best.pt is missing" in run_state(cfg).reason and run_state(cfg).state == "stale"
    (cfg.out / "last.pt").write_bytes(b"not a checkpoint")
    assert run_state(cfg).state == "stale"
    assert [p.name for p in sorted(cfg.out.iterdir())] == ["config.json", "curves.png", "last.pt", "log.jsonl"]  # read only


def test_ensure_trained_redoes_a_stale_run_and_reuses_a_done_one(shards_root, tmp_path):
    from refbench.train.runs import ensure_trained

    cfg = train_config(shards_root, tmp_path / "run", steps=1)
    cfg.out.mkdir()
    (cfg.out / "last.pt").write_bytes(b"left over")
    said = []
    state, best = ensure_trained(cfg, say=said.append)
    assert state.state == "stale" and "training it again" in said[0]
    assert checkpoint.load(best)["step"] == 1
    stamp = best.stat().st_mtime_ns
    again, best_again = ensure_trained(cfg, say=said.append)
    assert again.state == "done" and best_again == best and best.stat().st_mtime_ns == stamp and len(said) == 1
