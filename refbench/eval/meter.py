"""Means of per-sample figures over a split, mergeable across ranks: the base of the query-diversity
(refbench.eval.diversity) and sentence-sensitivity (refbench.eval.sensitivity) meters."""

from __future__ import annotations

from typing import Any, Mapping


class MeanMeter:
    """Sums and counts of per-sample figures {key: tensor [B]}; `means()` gives their means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: Mapping[str, Any], keep=None) -> None:
        """Add a batch's figures; `keep` (bool [B]), if given, marks the samples that count."""
        for k, v in stats.items():
            if keep is not None:
                v = v[keep.to(v.device)]
            self.sums[k] = self.sums.get(k, 0.0) + float(v.double().sum())
            self.counts[k] = self.counts.get(k, 0) + int(v.numel())

    def state(self) -> dict:
        """Picklable sums and counts (for gathering over ranks)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def merge(self, state: dict) -> None:
        for k, v in state["sums"].items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + state["counts"][k]

    def means(self, keys) -> dict[str, float]:
        """{key: mean} of the `keys` that were counted."""
        return {k: self.sums[k] / self.counts[k] for k in keys if self.counts.get(k)}
