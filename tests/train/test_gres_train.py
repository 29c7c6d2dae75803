"""Training on gRefCOCO (`--dataset grefcoco_unc`): train batches carry the no-target flag and an
empty mask for no-target refs, every model's loss is finite on an empty mask (a mean over pixels,
never divided by the target area), EAVL and CRIS with `nt_head` output `nt_logit` and add its
BCE, and a couple of steps of the training loop run for every model with and without the head."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _harness import read_log, train_config

from refbench import models
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.models.api import loss_terms
from refbench.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRES = "grefcoco_unc"


def _gres_batch(shards_root, size: int):
    """One train batch of gRefCOCO that holds at least one no-target ref."""
    for batch in train_stream.train_loader(shards_root / GRES, batch_size=16, image_size=size, seed=0):
        if batch["no_target"].any() and (~batch["no_target"]).any():
            return batch
    pytest.fail("no train batch of the synthetic gRefCOCO holds both kinds of refs")


def test_train_batches_carry_the_no_target_flag_and_empty_masks(shards_root):
    batch = _gres_batch(shards_root, 96)
    nt = batch["no_target"]
    assert nt.dtype == torch.bool and nt.shape == (16,)
    areas = batch["mask"].flatten(1).sum(1)
    assert (areas[nt] == 0).all() and (areas[~nt] > 0).all()
    refcoco = next(iter(train_stream.train_loader(shards_root / "refcoco_unc", batch_size=4, image_size=96, seed=0, num_batches=1)))
    assert not refcoco["no_target"].any()


@pytest.mark.parametrize("name,nt_head", [("eavl", False), ("eavl", True), ("cris", False), ("cris", True), ("blind", False)])
def test_empty_mask_loss_is_finite_and_the_head_adds_its_bce(shards_root, name, nt_head):
    torch.manual_seed(0)
    overrides = {"nt_head": True} if nt_head else {}
    net = models.build(name, "tiny", **overrides)
    batch = data.to_device(_gres_batch(shards_root, net.image_size), "cpu")
    out = net(batch["image"], batch["tokens"])
    assert ("nt_logit" in out) == nt_head
    if nt_head:
        assert out["nt_logit"].shape == (16,)
    empty = torch.zeros_like(batch["mask"])  # every sample no-target: target area 0 everywhere
    terms = loss_terms(net, out, empty, torch.ones(16, dtype=torch.bool))
    assert torch.isfinite(terms["loss"])
    terms = loss_terms(net, out, batch["mask"], batch["no_target"])
    assert torch.isfinite(terms["loss"])
    assert ("no_target" in terms) == nt_head
    terms["loss"].backward()
    if nt_head:
        assert net.nt_head.mlp[0].weight.grad.abs().sum() > 0


def test_loss_terms_keeps_two_argument_losses():
    class Old:
        def loss(self, out, mask):
            return {"loss": mask.sum()}

    assert loss_terms(Old(), {}, torch.ones(2), torch.ones(2, dtype=torch.bool))["loss"] == 2


@pytest.mark.parametrize("name,nt_head", [("eavl", False), ("eavl", True), ("cris", True), ("blind", False)])
def test_two_steps_on_grefcoco(shards_root, tmp_path, name, nt_head):
    cfg = train_config(shards_root, tmp_path / name, model=name, steps=2, val_max_batches=1,
                       model_overrides={"nt_head": True} if nt_head else {})
    run = train(dataclasses.replace(cfg, dataset=GRES))
    assert (run / "last.pt").exists()
    steps = [r for r in read_log(run) if "loss" in r]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert ("no_target" in steps[-1]) == nt_head


def test_best_checkpoint_is_chosen_on_val_giou(shards_root, tmp_path):
    """A gRefCOCO run validates with gRefCOCO's metrics (gIoU, cIoU, N-acc, T-acc under its protocol
    original) and keeps as best.pt the validation with the highest gIoU, not mIoU."""
    from refbench import checkpoint

    cfg = train_config(shards_root, tmp_path / "run", model="eavl", steps=3, val_every=1, val_max_batches=2)
    run = train(dataclasses.replace(cfg, dataset=GRES))
    vals = [r for r in read_log(run) if "val" in r]
    assert [r["step"] for r in vals] == [1, 2, 3]
    for r in vals:
        assert {"gIoU", "cIoU", "N-acc", "T-acc", "TP", "FN", "FP", "TN"} <= r["val"].keys()
        assert "mIoU" not in r["val"]
    top = max(vals, key=lambda r: r["val"]["gIoU"])  # the first of equal ones, as the loop keeps it (strict >)
    best = checkpoint.load(run / "best.pt")["best"]
    assert best == {"metric": "val gIoU (gRefCOCO original protocol)", "value": top["val"]["gIoU"], "step": top["step"]}
    assert (run / "curves.png").stat().st_size > 0
