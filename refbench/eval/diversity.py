"""Query diversity of multi-query models (EAVL): are the N_q queries really different queries?

A model "has queries" when its forward output holds `query_masks` [B,Nq,h,w] (the per-query
mask logits), and, optionally, `query_weights` [B,Nq] (the estimator's S_q, each row summing
to 1) and `word_attention` [B,Nq,L] (A: each row a softmax over the words, exactly 0 on
padding; position 0 is CLIP's [SOS] token). Four figures, each averaged over samples:

  query_mask_corr        mean pairwise Pearson correlation (over pixels) of the N_q mask logits
                         of a sample; 1.0 = one mask N_q times
  query_weight_entropy   entropy of S_q divided by log N_q; 1.0 = uniform weights, the estimator
                         weighs nothing
  word_attention_spread  standard deviation of A across the queries, averaged over the sample's
                         real (non-padding) words; 0.0 = every query attends to the words alike
  sos_attention          the queries' attention on [SOS], sum_n S_qn A_n0 (S_q uniform where the
                         estimator is ablated): CLIP's text encoder is causal, so [SOS] has the
                         same feature whatever the sentence; 1.0 = the queries read nothing of it

Why the last one: in the quickstart's 600-step tiny EAVL runs (testB, the GroupNorm head of
the time), seeds 0, 2 and 3 put 0.98, 0.81 and 0.88 of the queries' attention on [SOS] (their
kernels are language-free: refbench.eval.sensitivity's kernel figure reads 0.005-0.019 there against
CRIS's 0.45), seed 1 puts 0.00 there and 0.18 on [EOS]. It shows in no other figure of these
four; docs/eavl-readings.md has it for every reading measured.

A figure that does not exist for a model is left out: correlation and entropy need N_q >= 2,
entropy needs weights that are a distribution (not the all-ones of an ablated estimator), the
spread needs word attention and N_q >= 2, the [SOS] share word attention. `batch_means` /
`batch_stats` give a batch's means (training logs them in log.jsonl); `DiversityMeter`
accumulates a whole split (`refbench eval` prints it and keeps it in the result record's extras).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from refbench.eval.meter import MeanMeter

KEYS = ("query_mask_corr", "query_weight_entropy", "word_attention_spread", "sos_attention")
LABELS = {  # what each figure is, for printed lines
    "query_mask_corr": "mask correlation (mean pairwise Pearson of the query mask logits; 1 = identical)",
    "query_weight_entropy": "S_q entropy / log Nq (1 = uniform estimator weights)",
    "word_attention_spread": "word attention spread (std of A across queries; 0 = identical)",
    "sos_attention": "word attention on [SOS] (S_q-weighted; 1 = the queries read no word of the sentence)",
}


def has_queries(out: Mapping[str, Any]) -> bool:
    """Whether a forward output carries per-query masks."""
    return out.get("query_masks") is not None


def sample_stats(out: Mapping[str, Any]) -> dict[str, Any]:
    """Per-sample figures: {key: float tensor [B]} for the figures this output has."""
    import torch

    from refbench.models.blocks import mask_correlation

    stats: dict[str, Any] = {}
    masks = out.get("query_masks")
    if masks is None:
        return stats
    masks = masks.detach().float()  # [B,Nq,h,w]
    nq = masks.shape[1]
    w = out.get("query_weights")
    w = None if w is None else w.detach().float()  # [B,Nq]
    if w is not None and not torch.allclose(w.sum(dim=1), torch.ones_like(w[:, 0]), atol=1e-3):
        w = None  # an ablated estimator's all-ones are no distribution
    if nq >= 2:
        stats["query_mask_corr"] = mask_correlation(masks).clamp(-1.0, 1.0)  # float rounding aside
        if w is not None:
            entropy = -(w * w.clamp_min(1e-30).log()).sum(dim=1)
            stats["query_weight_entropy"] = (entropy / math.log(nq)).clamp(0.0, 1.0)
    attention = out.get("word_attention")
    if attention is not None:
        a = attention.detach().float()  # [B,Nq,L]
        if nq >= 2:
            real = (a > 0).any(dim=1)  # [B,L]: padding gets exactly 0 from every query
            spread = a.std(dim=1)  # [B,L]
            stats["word_attention_spread"] = (spread * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        on_sos = a[:, :, 0]  # [B,Nq]
        stats["sos_attention"] = (on_sos * w).sum(dim=1) if w is not None else on_sos.mean(dim=1)
    return stats


def batch_means(out: Mapping[str, Any]) -> dict[str, Any]:
    """A batch's mean figures as 0-dim tensors on the output's device (no host sync)."""
    return {k: v.mean() for k, v in sample_stats(out).items()}


def batch_stats(out: Mapping[str, Any]) -> dict[str, float]:
    """A batch's mean figures {key: float} ({} for a model without queries)."""
    return {k: float(v) for k, v in batch_means(out).items()}


class DiversityMeter(MeanMeter):
    """Sums of the per-sample figures over a split; `result()` gives the means."""

    def update(self, out: Mapping[str, Any]) -> None:
        self.add(sample_stats(out))

    def result(self) -> dict[str, Any] | None:
        """{key: mean, ..., "n": samples} or None when nothing had queries."""
        if not self.counts:
            return None
        return {**self.means(KEYS), "n": max(self.counts.values())}


def describe(stats: Mapping[str, Any]) -> list[str]:
    """One printable line per figure present in `stats`."""
    return [f"{LABELS[k]}: {stats[k]:.4f}" for k in KEYS if k in stats]
