"""`refbench eval` on gRefCOCO (refbench.eval.gres_eval): a checkpoint trained on grefcoco_unc is
scored into a valid gRefCOCO record (load_record recomputes it), the no-target decision comes from
nt_logit when the model has the head and from an empty mask otherwise, and RefCOCO-only
protocols are refused with one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _harness import train_config

from refbench.errors import RefbenchError
from refbench.eval import evaluate, gres_eval, gres_score, results
from refbench.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRES = "grefcoco_unc"


@pytest.fixture(scope="module", params=[False, True], ids=["empty-mask-rule", "nt-head"])
def gres_run(request, shards_root, tmp_path_factory):
    """A tiny EAVL at its seeded init (one step at lr 0) on grefcoco_unc, with or without nt_head."""
    from _harness import torch_threads

    cfg = train_config(shards_root, tmp_path_factory.mktemp("gres") / "eavl", steps=1, lr=0.0, min_lr=0.0,
                       model_overrides={"nt_head": request.param})
    with torch_threads(1):
        return train(dataclasses.replace(cfg, dataset=GRES)), request.param


def test_eval_writes_a_valid_gres_record(gres_run, shards_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich: the whole table on one line per row
    run, nt_head = gres_run
    done = evaluate.evaluate_checkpoint(run / "best.pt", splits=["val"], shards=shards_root, results=tmp_path / "r",
                                        workers=0, batch_size=8)
    rec = results.load_record(done[0].path)  # recomputes every metric from the sidecar
    assert rec.meta["task"] == "gres" and rec.meta["source"] == "measured" and rec.protocol["name"] == "original"
    assert rec.meta["data"]["synthetic"] is True
    truth = gres_score.ground_truth(shards_root / GRES, split="val")
    assert rec.metrics["n"] == len(truth) and rec.metrics["n_no_target"] == sum(truth.no_target)
    for k in ("gIoU", "cIoU", "N-acc", "T-acc"):
        assert rec.metrics[k] is None or 0 <= rec.metrics[k] <= 1
    evaluate.print_scores(done)
    text = capsys.readouterr().out
    assert "gIoU" in text and "N-acc" in text and "grefcoco_unc" in text and "synthetic" in text and "protocol original" in text
    assert ("nt_logit > 0" in text) == nt_head


def test_decision_reads_nt_logit_when_there_is_one():
    batch = {"gt_mask": [torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)]}
    inter, union = np.array([4, 0, 0]), np.array([4, 3, 0])  # predicted areas 4, 3, 0
    assert gres_eval.no_target_decision({}, inter, union, batch).tolist() == [False, False, True]
    out = {"nt_logit": torch.tensor([0.5, -1.0, -0.1])}  # the head overrides the masks
    assert gres_eval.no_target_decision(out, inter, union, batch).tolist() == [True, False, False]


def test_refcoco_only_protocol_is_refused(gres_run, shards_root, tmp_path):
    run, _ = gres_run
    with pytest.raises(RefbenchError, match="protocol original only"):
        evaluate.evaluate_checkpoint(run / "best.pt", splits=["val"], shards=shards_root, results=tmp_path / "r",
                                     protocol="input", workers=0)
