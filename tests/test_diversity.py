"""Query diversity (refbench.diversity): the figures on known inputs, and training logging them."""

from __future__ import annotations

import math

import pytest
import torch

from refbench import diversity
from refbench.models.blocks import mask_correlation


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
    assert all(math.isfinite(r["word_attention_spread"]) for r in steps)
