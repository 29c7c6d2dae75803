"""Query diversity (refbench.eval.diversity): the figures on known inputs, and training logging them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from refbench import models
from refbench.data import eval_stream
from refbench.data import shards as data
from refbench.data import train_stream
from refbench.eval import diversity
from refbench.models.blocks import mask_correlation

DATASET = "refcoco_unc"


def test_figures_of_collapsed_queries():
    """One mask repeated, uniform weights, one attention row repeated: the collapse reads as such."""
    g = torch.Generator().manual_seed(0)
    one = torch.randn(2, 1, 8, 8, generator=g)
    row = torch.tensor([0.5, 0.3, 0.2, 0.0])  # the last word is padding
    out = {"query_masks": one.expand(2, 5, 8, 8), "query_weights": torch.full((2, 5), 0.2),
           "word_attention": row.expand(2, 5, 4)}
    stats = diversity.batch_stats(out)
    assert stats["query_mask_corr"] == pytest.approx(1.0, abs=1e-5)
    assert stats["query_weight_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert stats["word_attention_spread"] == pytest.approx(0.0, abs=1e-7)
    assert stats["sos_attention"] == pytest.approx(0.5, abs=1e-6)  # every query puts 0.5 on [SOS]


def test_sos_attention_is_the_estimators_weighted_share():
    """sum_n S_qn A_n0 per sample: a query on [SOS] counts by its weight; without an estimator
    (all-ones weights) every query counts alike."""
    attention = torch.zeros(2, 2, 4)
    attention[:, 0, 0] = 1.0  # query 0 reads only [SOS]
    attention[:, 1, 1] = 1.0  # query 1 reads the first word
    masks = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    weighted = {"query_masks": masks, "query_weights": torch.tensor([[0.25, 0.75], [1.0, 0.0]]),
                "word_attention": attention}
    assert diversity.sample_stats(weighted)["sos_attention"].tolist() == pytest.approx([0.25, 1.0])
    summed = {**weighted, "query_weights": torch.ones(2, 2)}
    assert diversity.sample_stats(summed)["sos_attention"].tolist() == pytest.approx([0.5, 0.5])


def test_figures_of_distinct_queries():
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(3, 6, 32, 32, generator=g)  # independent masks
    weights = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3)  # one query takes all the weight
    attention = torch.zeros(3, 6, 5)
    attention[:, :3, 0] = 1.0  # half the queries on word 0, half on word 1; words 2-4 are padding
    attention[:, 3:, 1] = 1.0
    stats = diversity.batch_stats({"query_masks": masks, "query_weights": weights, "word_attention": attention})
    assert abs(stats["query_mask_corr"]) < 0.05
    assert stats["query_weight_entropy"] == pytest.approx(0.0, abs=1e-6)
    # std over 6 queries of (1,1,1,0,0,0) on each real word, padding words not counted
    assert stats["word_attention_spread"] == pytest.approx(torch.tensor([1.0, 1, 1, 0, 0, 0]).std().item(), rel=1e-5)
    assert stats["sos_attention"] == pytest.approx(1.0)  # the one weighted query reads word 0, [SOS]


def test_mask_correlation_matches_pearson_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    masks = torch.randn(2, 3, 5, 7, generator=g, requires_grad=True)
    corr = mask_correlation(masks)
    for b in range(2):
        c = torch.corrcoef(masks[b].detach().flatten(1))
        expected = (c.sum() - c.diagonal().sum()) / 6
        assert corr[b].item() == pytest.approx(expected.item(), abs=1e-5)
    corr.sum().backward()
    assert torch.isfinite(masks.grad).all() and masks.grad.abs().sum() > 0


def test_figures_that_do_not_exist_are_left_out():
    masks = torch.randn(2, 1, 4, 4)
    assert diversity.batch_stats({"logits": masks}) == {}  # no queries
    assert diversity.batch_stats({"query_masks": masks, "query_weights": torch.ones(2, 1)}) == {}  # Nq = 1
    summed = diversity.batch_stats({"query_masks": torch.randn(2, 3, 4, 4), "query_weights": torch.ones(2, 3)})
    assert set(summed) == {"query_mask_corr"}  # an ablated estimator's all-ones are no distribution


def test_meter_over_batches_equals_one_batch():
    g = torch.Generator().manual_seed(2)
    masks, weights = torch.randn(6, 4, 8, 8, generator=g), torch.rand(6, 4, generator=g).softmax(-1)
    whole = diversity.DiversityMeter()
    whole.update({"query_masks": masks, "query_weights": weights})
    parts = [diversity.DiversityMeter() for _ in range(2)]
    parts[0].update({"query_masks": masks[:2], "query_weights": weights[:2]})
    parts[1].update({"query_masks": masks[2:], "query_weights": weights[2:]})
    merged = diversity.DiversityMeter()
    for p in parts:
        merged.merge(p.state())
    a, b = whole.result(), merged.result()
    assert a["n"] == b["n"] == 6
    assert all(a[k] == pytest.approx(b[k], rel=1e-9) for k in ("query_mask_corr", "query_weight_entropy"))
    assert diversity.DiversityMeter().result() is None


def test_training_logs_query_diversity(tiny_run):
    from _harness import read_log

    steps = [r for r in read_log(tiny_run) if "loss" in r]
    assert steps and all(set(diversity.KEYS) <= set(r) for r in steps)
    assert all(-1.0 <= r["query_mask_corr"] <= 1.0 and 0.0 <= r["query_weight_entropy"] <= 1.0 for r in steps)
    assert all(math.isfinite(r["word_attention_spread"]) and 0.0 <= r["sos_attention"] <= 1.0 + 1e-6 for r in steps)


def test_absolute_correlation_counts_a_complement_as_alike():
    g = torch.Generator().manual_seed(3)
    one = torch.randn(2, 1, 8, 8, generator=g)
    pair = torch.cat([one, -one], dim=1)  # a mask and its complement
    assert mask_correlation(pair)[0].item() == pytest.approx(-1.0, abs=1e-5)
    assert mask_correlation(pair, absolute=True)[0].item() == pytest.approx(1.0, abs=1e-5)


def _test_batch(shards_root: Path, image_size: int, n: int = 16) -> dict:
    manifest = data.load_manifest(shards_root / DATASET)
    loader = eval_stream.eval_loader(shards_root / DATASET, manifest, split="testB", image_size=image_size,
                              batch_size=n, workers=0)
    return data.to_device(next(iter(loader)), "cpu")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eavl_queries_differ_at_init(shards_root, seed):
    """At initialisation the N_q queries attend to the words differently, their masks are not one
    mask, and S_q depends on the query (0.51 to 0.73 mask correlation over seeds 0-4 on a
    quickstart testB batch; 1.0000 before the fix)."""
    torch.manual_seed(seed)
    net = models.build("eavl", "tiny").eval()
    batch = _test_batch(shards_root, net.image_size)
    with torch.no_grad():
        stats = diversity.batch_stats(net(batch["image"], batch["tokens"]))
    assert stats["query_mask_corr"] < 0.9, stats
    assert stats["word_attention_spread"] > 0.1, stats
    assert stats["query_weight_entropy"] < 1.0 - 1e-3, stats


def test_plain_linear_generator_collapses_at_init(shards_root):
    """The cause, kept as a regression check: without normalisation (query_norm="none") eq 8's
    product of two small ReLU outputs leaves every later projection at its bias, so all queries
    are one query."""
    torch.manual_seed(0)
    net = models.build("eavl", "tiny", query_norm="none").eval()
    batch = _test_batch(shards_root, net.image_size)
    with torch.no_grad():
        stats = diversity.batch_stats(net(batch["image"], batch["tokens"]))
    assert stats["query_mask_corr"] > 0.99 and stats["word_attention_spread"] < 1e-3, stats


def _short_training(shards_root: Path, steps: int, **overrides) -> list[dict]:
    """Train a tiny EAVL `steps` AdamW steps (the tiny recipe's peak lr) on four fixed train batches
    of 4, on one thread (a few dozen steps at a constant peak lr are chaotic: the float summation
    order of two threads gives another run); returns refbench.eval.diversity's figures on a testB
    batch before and after."""
    from _harness import torch_threads

    with torch_threads(1):
        return _short_training_run(shards_root, steps, **overrides)


def _short_training_run(shards_root: Path, steps: int, **overrides) -> list[dict]:
    torch.manual_seed(0)
    net = models.build("eavl", "tiny", **overrides)
    manifest = data.load_manifest(shards_root / DATASET)
    train = iter(train_stream.train_loader(shards_root / DATASET, manifest, split="train", image_size=net.image_size,
                                   batch_size=4, seed=0, epoch=0, num_batches=4, workers=0))
    batches = [data.to_device(next(train), "cpu") for _ in range(4)]
    probe = _test_batch(shards_root, net.image_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=6e-4, weight_decay=1e-4)
    figures = []
    for step in range(steps + 1):
        if step in (0, steps):
            net.eval()
            with torch.no_grad():
                figures.append(diversity.batch_stats(net(probe["image"], probe["tokens"])))
            net.train()
        if step == steps:
            break
        b = batches[step % len(batches)]
        loss = net.loss(net(b["image"], b["tokens"]), b["mask"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return figures


def test_paper_loss_alone_collapses_the_queries_in_training(shards_root):
    """Why the decorrelation term exists: with the paper's loss alone (decorrelation=0) the
    distinct queries of the initialisation become one within a few steps, since eq 14 hands
    every mask the same gradient S_qn dL/dy."""
    before, after = _short_training(shards_root, 60, decorrelation=0.0)
    assert before["query_mask_corr"] < 0.9, before
    assert after["query_mask_corr"] > 0.95, after


def test_decorrelation_keeps_the_queries_apart_in_training(shards_root):
    """With the term, the same run ends with distinct masks (it pulls them apart once the
    paper's loss has pushed them above the margin: 0.77 -> 0.995 -> 0.65 at steps 0, 10, 60)."""
    before, after = _short_training(shards_root, 60, decorrelation=1.0)  # the default 0.1 needs longer runs
    assert before["query_mask_corr"] < 0.9, before
    assert after["query_mask_corr"] < 0.9, after


def test_decorrelation_term_is_zero_below_the_margin_and_pushes_above_it():
    torch.manual_seed(0)
    net = models.build("eavl", "tiny", num_queries=4)
    mask = torch.zeros(2, 1, net.image_size, net.image_size)
    side = net.image_size // 4
    logits = torch.zeros(2, 1, side, side)
    same = (4 * torch.randn(2, 1, side, side)).expand(2, 4, -1, -1).clone().requires_grad_()
    terms = net.loss({"logits": logits, "query_masks": same}, mask)
    assert terms["decorrelation"].item() == pytest.approx(1.0 - net.decorrelation_margin, abs=1e-4)
    terms["loss"].backward()
    assert same.grad.abs().sum() > 0
    complement = torch.cat([same[:, :2], -same[:, :2]], dim=1).detach()  # sigmoid(-x) = 1 - sigmoid(x)
    assert net.loss({"logits": logits, "query_masks": complement}, mask)["decorrelation"].item() == pytest.approx(
        1.0 - net.decorrelation_margin, abs=1e-4)  # opposites count as alike: no gaming by complements
    apart = 4 * torch.randn(2, 4, side, side)  # independent: correlation ~0
    assert net.loss({"logits": logits, "query_masks": apart}, mask)["decorrelation"].item() == 0.0
    plain = models.build("eavl", "tiny", num_queries=4, decorrelation=0.0)
    assert "decorrelation" not in plain.loss({"logits": logits, "query_masks": same}, mask)
