"""Result records for tests: synthetic per-sentence rows and a RefCOCO record written from them
(tests/eval/test_results.py, tests/report/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refbench.eval import results


def make_sentences(n: int, seed: int = 0, gain: int = 0) -> dict[str, list]:
    """n synthetic per-sentence rows; `gain` adds pixels to every intersection (a better model)."""
    rng = np.random.default_rng(seed)
    union = rng.integers(50, 500, n)
    inter = np.minimum((union * rng.beta(3, 2, n)).astype(np.int64) + gain, union)
    union[0], inter[0] = 0, 0  # one empty union
    words = ["man", "on", "left", "red", "car", "the", "big", "dog", "umbrella", "right"]
    return {
        "sent_id": list(range(100, 100 + n)),
        "ref_id": [i // 3 for i in range(n)],
        "image_id": [i // 6 for i in range(n)],
        "category_id": rng.integers(1, 5, n).tolist(),
        "sent": [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(n)],
        "I": inter.tolist(),
        "U": union.tolist(),
    }


def write(root: Path, n: int = 60, *, split: str = "testB", protocol: str = "original", run: str = "r1",
          expected: int | None = None, sentences: dict | None = None, **kw) -> Path:
    return results.write_record(
        root,
        dataset="refcoco_unc",
        split=split,
        protocol=protocol,
        threshold=0.35,
        model=results.ModelInfo(name="eavl", variant="tiny", config={"num_queries": 4}, run=run,
                                checkpoint="runs/x/best.pt", checkpoint_sha256="ab" * 32, step=120),
        data=results.DataInfo(manifest_sha256="cd" * 32, sentences_expected=n if expected is None else expected),
        sentences=sentences if sentences is not None else make_sentences(n),
        command="refbench eval --checkpoint runs/x/best.pt",
        samples=200,
        **kw,
    )
