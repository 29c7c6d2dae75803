"""Sentence sensitivity: does a model's output depend on the sentence it is given?

A measurement that needs no attention bookkeeping, so it applies to every model alike. For
each sentence of a split, the model runs a second time on the same image with the sentence
swapped for one of another ref of the same image (another object: `refbench.data`'s eval
loader picks it, `swap_tokens`), and two figures compare the two forwards:

  mask_sensitivity    1 - IoU of the two binarised predictions (sigmoid(logits) > the model's
                      threshold, on the logit grid): 0 = the same mask whatever the sentence,
                      1 = disjoint masks. Two empty masks count as the same (0).
  kernel_sensitivity  ||k(s) - k(s')|| / ||k(s)||, the relative change of the kernel that scores
                      the pixels, for models whose forward returns it (`kernel` [B,P]; weights
                      and bias of a 3x3 kernel): CRIS's is generated from the sentence feature,
                      EAVL's is the S_q-weighted sum of its query kernels (eq 14 sums linear
                      convolutions, so the final mask is one convolution with that kernel),
                      a fixed head's (the blind control, EAVL's fixed aligner) is the same for
                      every input: exactly 0.

Sentences whose image has a single ref have no swap and are not counted (`n` says how many
are). The swap sentence is that of the next ref of the image (cyclically), at the same index
modulo its sentence count: deterministic, so a record's figures are reproducible.

`SensitivityMeter` accumulates a split (`refbench eval` prints the means and keeps them in the
record's extras under "sentence_sensitivity").
"""

from __future__ import annotations

from typing import Any, Mapping

from refbench.eval.meter import MeanMeter

KEYS = ("mask_sensitivity", "kernel_sensitivity")
LABELS = {
    "mask_sensitivity": "mask sensitivity (1 - IoU of the masks for two sentences of the same image; 0 = ignores the sentence)",
    "kernel_sensitivity": "kernel sensitivity (relative change of the pixel-scoring kernel; 0 = one kernel for every sentence)",
}


def sample_stats(out_a: Mapping[str, Any], out_b: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    """Per-sample figures {key: float tensor [B]} of two forwards on the same images, sentence a
    and sentence b; `kernel_sensitivity` only where both outputs carry a `kernel`."""
    import torch

    fg_a = torch.sigmoid(out_a["logits"].detach().float()) > threshold  # [B,1,h,w]
    fg_b = torch.sigmoid(out_b["logits"].detach().float()) > threshold
    inter = (fg_a & fg_b).flatten(1).sum(1)
    union = (fg_a | fg_b).flatten(1).sum(1)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float32))
    stats = {"mask_sensitivity": 1.0 - iou.float()}
    k_a, k_b = out_a.get("kernel"), out_b.get("kernel")
    if k_a is not None and k_b is not None:
        k_a, k_b = k_a.detach().double().flatten(1), k_b.detach().double().flatten(1)  # [B,P]
        stats["kernel_sensitivity"] = ((k_a - k_b).norm(dim=1) / k_a.norm(dim=1).clamp_min(1e-12)).float()
    return stats


class SensitivityMeter(MeanMeter):
    """Sums of the per-sample figures over a split; `result()` gives the means."""

    def update(self, out_a: Mapping[str, Any], out_b: Mapping[str, Any], threshold: float, keep=None) -> None:
        """Add a batch; `keep` (bool [B]) marks the samples that count (those with a swap)."""
        self.add(sample_stats(out_a, out_b, threshold), keep)

    def result(self) -> dict[str, Any] | None:
        """{key: mean, ..., "n": sentences counted} or None when no sentence had a swap."""
        if not self.counts.get("mask_sensitivity"):
            return None
        return {**self.means(KEYS), "n": self.counts["mask_sensitivity"]}


def describe(stats: Mapping[str, Any]) -> list[str]:
    """One printable line per figure present in `stats`."""
    return [f"{LABELS[k]}: {stats[k]:.4f}" for k in KEYS if k in stats]
