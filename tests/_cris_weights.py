"""Seeded random weights for a CRIS.pytorch checkpoint, from its key and shape list.

The CRIS parity fixture (tests/fixtures/cris_parity/) was made by building CRIS's own RN50
model, filling its state dict with `seeded_state_dict(keys_shapes, seed)` and running CRIS's
code; the tests regenerate the same tensors from the stored list and seed, so no weights are
stored. Values are scaled so activations stay finite through the 50-layer trunk (fan-in
scaled matrices, BatchNorm statistics near 1, LayerNorm/BN gains near 1, small biases).
"""

from __future__ import annotations

import math

import torch


def seeded_state_dict(keys_shapes: list[tuple[str, list[int]]], seed: int) -> dict[str, torch.Tensor]:
    """{key: tensor} in the given order, every tensor drawn from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in keys_shapes:
        shape = tuple(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 0:  # CLIP's logit_scale
            t = torch.tensor(math.log(1 / 0.07))
        elif len(shape) == 1 and leaf == "weight":  # BatchNorm / LayerNorm gains
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # biases, CLIP's class embedding
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[key] = t
    return out
