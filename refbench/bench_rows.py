"""Result rows and paired timing shared by `refbench bench` and the benchmarks it dispatches to.

A row is a dict: bench, what (the quantity, with its unit, data set and setting), ours,
baseline, baseline_is (what the baseline does, in words), ratio (ours / baseline), target and ok.
Timings alternate the sides repetition by repetition; a ratio is the median of per-repetition ratios.
"""

from __future__ import annotations

import statistics
from typing import Callable


def row(bench: str, what: str, ours: float, baseline: float, target: float | None, ratio: float | None = None,
         *, at_least: bool = False, baseline_is: str | None = None) -> dict:
    """One result; `ratio` defaults to ours / baseline; the target is a ceiling, or a floor when `at_least`."""
    ratio = ours / baseline if ratio is None else ratio
    return {
        "bench": bench,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "baseline_is": baseline_is,
        "ratio": ratio,
        "target": None if target is None else f"{'>=' if at_least else '<='} {target}",
        "ok": None if target is None else (ratio >= target if at_least else ratio <= target),
    }


def interleaved(sides: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Call each side once per repetition, alternating which goes first; the timed results per side."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            value = sides[name]()
            if rep >= warmup:
                out[name].append(value)
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-repetition ratios a_i / b_i (each pair ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))
