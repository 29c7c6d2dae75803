"""Helpers shared by the model tests: CLIP-style token batches."""

from __future__ import annotations

import torch

SOT, EOT = 49406, 49407  # CLIP start / end of text ids


def make_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """CLIP-style ids [batch, length]: SOT, random words, EOT (the row's largest id), 0 padding.

    Rows have different sentence lengths, so a batch mixes short and long padding.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n_words = 1 + (row * 3) % (length - 2)
        tokens[row, 0] = SOT
        tokens[row, 1 : 1 + n_words] = torch.randint(1, 49400, (n_words,), generator=g)
        tokens[row, 1 + n_words] = EOT
    return tokens
