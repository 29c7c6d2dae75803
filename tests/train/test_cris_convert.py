"""`refbench convert cris`: CRIS.pytorch checkpoints in, refbench checkpoints out, misfits listed.

Fast cases on the tiny CRIS (its ResNet trunk in CRIS's layout): a CRIS-format state dict made
from a tiny model by the inverse of `CRIS_KEY_RULES` converts back to the same outputs, and a
missing, an extra or a mis-shaped key is refused with the key named (one line, exit 2, nothing
written). The RN50 parity with CRIS's own code is tests/models/test_cris_parity.py.
"""

from __future__ import annotations

import collections
import re

import pytest
import torch
from _harness import assert_cli_ok, cli

from refbench import checkpoint, models
from refbench.eval import evaluate
from refbench.models import cris

# ours -> CRIS.pytorch (the inverse of cris.CRIS_KEY_RULES), for making CRIS-format test files
INVERSE = (
    (r"^backbone\.image_encoder\.connect\.", "backbone.visual.attnpool.connect."),
    (r"^backbone\.image_encoder\.visual\.", "backbone.visual."),
    (r"^backbone\.text_encoder\.", "backbone."),
    (r"^neck\.coordconv\.0\.conv\.", "neck.coordconv.0.conv1."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.multihead_attn."),
    (r"^pixel\.", "proj.vis."),
    (r"^sentence_kernel\.", "proj.txt."),
)


def to_cris(name: str) -> str:
    for pattern, repl in INVERSE:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name, count=1)
    return name


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    net = models.build("cris", "tiny", quick_gelu=True).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so a wrong mapping shows
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    sd = {"module." + to_cris(k): v.clone() for k, v in net.state_dict().items()}
    sd["module.backbone.logit_scale"] = torch.tensor(4.6)  # in every CRIS checkpoint, dropped
    return net, sd


def save_cris(path, sd):
    torch.save({"epoch": 50, "cur_iou": 0.6, "best_iou": 0.7, "prec": {}, "state_dict": sd, "optimizer": {},
                "scheduler": {"milestones": collections.Counter({35: 1}), "gamma": 0.1}}, path)
    return path


def test_every_cris_key_has_a_rule_and_lands_on_a_model_key(tiny):
    net, sd = tiny
    ours = net.state_dict()
    targets = [cris.cris_key(k[len("module."):]) for k in sd]
    assert targets.count(cris.DROPPED) == 1  # logit_scale
    assert sorted(t for t in targets if t is not cris.DROPPED) == sorted(ours)


def test_convert_round_trip_gives_the_same_logits(tiny, tmp_path):
    net, sd = tiny
    src = save_cris(tmp_path / "best_model.pth", sd)
    out = tmp_path / "cris.pt"
    assert_cli_ok(cli("convert", "cris", src, "--out", out, "--variant", "tiny", "--image-size", "96",
                      "--dataset", "refcoco_unc"))
    ckpt = checkpoint.load(out)
    assert ckpt["model"]["name"] == "cris" and ckpt["model"]["variant"] == "tiny"
    assert ckpt["model"]["config"]["quick_gelu"] and ckpt["model"]["config"]["norm"] == "batch"
    assert ckpt["dataset"]["name"] == "refcoco_unc" and ckpt["converted_from"]["epoch"] == 50
    assert evaluate.checkpoint_protocol(ckpt) == "cris"  # scored under CRIS's chain unless told otherwise
    rebuilt = checkpoint.build_model(ckpt, out)
    image = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[49406, 786, 530, 1449, 49407] + [0] * 12] * 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(image, tokens)["logits"], net(image, tokens)["logits"], rtol=0, atol=0)


def test_variant_is_read_from_the_checkpoint_or_asked_for(tiny, tmp_path):
    _, sd = tiny
    src = save_cris(tmp_path / "tiny.pth", sd)
    result = cli("convert", "cris", src, "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "cannot tell the backbone: stage 3 has 1 blocks" in result.output
    assert "--variant" in result.output and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ("drop", r"1 missing key\(s\): neck\.f2_cat\.0\.weight"),
        ("extra", r"1 extra key\(s\): neck\.unknown\.weight"),
        ("shape", r"1 mis-shaped key\(s\): proj\.txt\.weight \[\d+, \d+\] \(refbench sentence_kernel\.weight"),
    ],
)
def test_misfits_are_listed_and_nothing_is_written(tiny, tmp_path, edit, message):
    _, sd = tiny
    sd = dict(sd)
    if edit == "drop":
        del sd["module.neck.f2_cat.0.weight"]
    elif edit == "extra":
        sd["module.neck.unknown.weight"] = torch.zeros(3)
    else:
        sd["module.proj.txt.weight"] = torch.zeros(5, 7)
    src = save_cris(tmp_path / "bad.pth", sd)
    result = cli("convert", "cris", src, "--out", tmp_path / "x.pt", "--variant", "tiny")
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.pt").exists()


def test_unreadable_and_foreign_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    result = cli("convert", "cris", junk, "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "not a readable torch checkpoint" in result.output
    torch.save({"epoch": 1}, tmp_path / "nosd.pth")
    result = cli("convert", "cris", tmp_path / "nosd.pth", "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "no CRIS state dict" in result.output
