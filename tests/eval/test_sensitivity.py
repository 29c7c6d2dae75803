"""Sentence sensitivity (refbench.eval.sensitivity): the figures on known inputs, the swap sentence
the eval loader picks, and `score_split` on real models: a model that ignores the sentence
reads 0, one that reads it reads more than 0."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import make_tokens

from refbench import models
from refbench.data import eval_stream
from refbench.data import shards as data
from refbench.distributed import setup_distributed
from refbench.eval import evaluate, sensitivity
from refbench.models.blocks import dynamic_conv

DATASET = "refcoco_unc"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_figures_on_known_outputs():
    fg, bg = torch.full((1, 1, 4, 4), 5.0), torch.full((1, 1, 4, 4), -5.0)
    half = bg.clone()
    half[..., :2, :] = 5.0  # the top half foreground: IoU 0.5 with all-foreground
    a = {"logits": torch.cat([fg, fg, bg, fg]), "kernel": torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 4.0]])}
    b = {"logits": torch.cat([fg, half, bg, bg]), "kernel": torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])}
    stats = sensitivity.sample_stats(a, b, threshold=0.35)
    # same mask; IoU 0.5; both empty (the same prediction); disjoint (all vs none)
    assert stats["mask_sensitivity"].tolist() == pytest.approx([0.0, 0.5, 0.0, 1.0])
    # ||k - k'|| / ||k||: unchanged, sqrt(2) / 1, unchanged, 5 / 5
    assert stats["kernel_sensitivity"].tolist() == pytest.approx([0.0, 2 ** 0.5, 0.0, 1.0])
    meter = sensitivity.SensitivityMeter()
    meter.update(a, b, 0.35, keep=torch.tensor([True, True, False, True]))  # the third has no swap
    assert meter.result() == pytest.approx({"mask_sensitivity": 0.5, "kernel_sensitivity": (2 ** 0.5 + 1) / 3, "n": 3})
    assert "kernel_sensitivity" not in sensitivity.sample_stats({"logits": fg}, {"logits": fg}, 0.35)


def test_swap_is_a_sentence_of_another_ref_of_the_same_image(shards_root):
    """Every sentence's stand-in comes from another ref of its own image (a different object),
    and a sentence of an image with a single ref has none."""
    ds = shards_root / DATASET
    manifest = data.load_manifest(ds)
    owner: dict[tuple, set] = {}  # tokens -> {(image_id, ref_id)} of the sentences that have them
    images: dict[int, set] = {}  # image_id -> its ref ids
    items = []
    for batch in eval_stream.eval_loader(ds, manifest, split="testB", image_size=96, batch_size=4):
        for i, (image_id, ref_id) in enumerate(zip(batch["image_id"], batch["ref_id"])):
            owner.setdefault(tuple(batch["tokens"][i].tolist()), set()).add((image_id, ref_id))
            images.setdefault(image_id, set()).add(ref_id)
            items.append((image_id, ref_id, bool(batch["has_swap"][i]), tuple(batch["swap_tokens"][i].tolist())))
    assert any(has for *_, has, _ in items)
    for image_id, ref_id, has, swap in items:
        assert has == (len(images[image_id]) > 1)
        if has:
            assert any(img == image_id and ref != ref_id for img, ref in owner[swap]), (image_id, ref_id)


def test_swap_tokens_rule():
    refs = [{"sentences": [{"tokens": [1]}, {"tokens": [2]}]}, {"sentences": []}, {"sentences": [{"tokens": [3]}]}]
    assert eval_stream.swap_tokens(refs, 0, 1) == [3]  # the next ref with sentences, index modulo its count
    assert eval_stream.swap_tokens(refs, 2, 0) == [1]  # cyclically
    assert eval_stream.swap_tokens(refs[:1], 0, 0) is None  # one ref: no swap


def _scored(name: str, shards_root, **overrides) -> dict:
    torch.manual_seed(0)
    net = models.build(name, "tiny", **overrides)
    ds = shards_root / DATASET
    scores = evaluate.score_split(net, ds, data.load_manifest(ds), "testB", setup_distributed(), batch_size=8,
                                  sensitivity=True)
    assert scores.sensitivity["n"] > 0
    return scores.sensitivity


def test_a_model_that_ignores_the_sentence_reads_zero(shards_root):
    stats = _scored("blind", shards_root)
    assert stats["mask_sensitivity"] == 0.0 and stats["kernel_sensitivity"] == 0.0
    fixed = _scored("eavl", shards_root, aligner="fixed")  # reads the sentence, but its kernel is fixed
    assert fixed["kernel_sensitivity"] == 0.0


def test_a_model_that_reads_the_sentence_reads_more_than_zero(shards_root):
    """At random init CRIS's masks already move with the sentence; EAVL's binarised masks may
    all be foreground there, but its generated kernel moves."""
    cris = _scored("cris", shards_root)
    assert cris["mask_sensitivity"] > 0.0 and cris["kernel_sensitivity"] > 1e-3, cris
    eavl = _scored("eavl", shards_root)
    assert eavl["kernel_sensitivity"] > 1e-3, eavl


def test_eavl_kernel_is_the_one_convolution_its_mask_sum_is():
    """Eq 14 sums linear convolutions: convolving F_p with the returned kernel gives the logits."""
    torch.manual_seed(0)
    net = models.build("eavl", "tiny").eval()
    seen = {}
    net.aligner.pixel.register_forward_hook(lambda mod, args, out: seen.setdefault("f_p", out))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 96, 96), make_tokens(2, 17))
        one = dynamic_conv(seen["f_p"], out["kernel"][:, None, :])
    torch.testing.assert_close(one, out["logits"], rtol=1e-4, atol=1e-4)
