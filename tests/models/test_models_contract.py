"""The model contract, checked on every registered model's tiny variants (models/api.py).

The parametrisation walks `models.names()` and each spec's variants, so a newly registered
model is covered without touching this file. Full-size variants run one random-init forward
at 480 px on CPU; rn50 EAVL stays in the default run, the rest are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from refbench import models
from _model_helpers import make_tokens

TINY = [(name, variant) for name in models.names() for variant in models.get_spec(name).variants if variant.startswith("tiny")]


def build(name: str, variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, variant, **overrides)


@pytest.mark.parametrize("name,variant", TINY, ids=[f"{n}-{v}" for n, v in TINY])
def test_contract(name, variant):
    model = build(name, variant)
    assert model.threshold == 0.35 and isinstance(model.image_size, int)
    size = model.image_size
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, size, size, generator=g)
    mask = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()

    for length in (17, 22):
        model.train()
        model.zero_grad()
        out = model(image, make_tokens(2, length))
        logits = out["logits"]
        assert logits.dtype == torch.float32 and logits.shape[:2] == (2, 1) and logits.shape[-1] == logits.shape[-2]
        assert size % logits.shape[-1] == 0, "the mask grid must divide the input"
        assert torch.isfinite(logits).all()
        if "kernel" in out:  # the pixel-scoring kernel (refbench.eval.sensitivity): one row per sample
            assert out["kernel"].ndim == 2 and out["kernel"].shape[0] == 2 and torch.isfinite(out["kernel"]).all()
        losses = model.loss(out, mask)
        assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
        losses["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g_).all() for g_ in grads)
        # models on the shared CLIP backbone expose both encoders; any other model is checked whole
        backbone = getattr(model, "backbone", None)
        encoders = {"image": backbone.image_encoder, "text": backbone.text_encoder} if backbone else {"model": model}
        for which, encoder in encoders.items():
            if encoder is None:  # the blind control has no text tower
                continue
            reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
            assert reached, f"no gradient reaches the {which} encoder of {name}/{variant}"

    # eval is deterministic, and a rebuilt model with the loaded state gives the same outputs
    tokens = make_tokens(2, 17, seed=5)
    model.eval()
    with torch.no_grad():
        first, second = model(image, tokens), model(image, tokens)
        assert torch.equal(first["logits"], second["logits"])
        rebuilt = build(name, variant, seed=123)
        assert not torch.equal(rebuilt.eval()(image, tokens)["logits"], first["logits"]), "different seeds, different weights"
        rebuilt.load_state_dict(model.state_dict())
        again = rebuilt.eval()(image, tokens)
    for key, value in first.items():
        assert torch.equal(again[key], value), key


FULL = [
    pytest.param("eavl", "rn50"),
    *[pytest.param("eavl", v, marks=pytest.mark.slow) for v in ("rn101", "vitb16", "vitl14")],
    *[pytest.param("cris", v, marks=pytest.mark.slow) for v in ("rn50", "rn101", "vitb16", "vitl14")],
    pytest.param("blind", "rn50", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,variant", FULL)
def test_full_size_forward(name, variant):
    """Random-init full-size model, one forward at 480 px: the paper's feature and mask shapes."""
    model = build(name, variant).eval()
    assert model.image_size == 480
    image = torch.randn(1, 3, 480, 480)
    with torch.no_grad():
        feats = model.backbone.image_encoder(image)
        out = model(image, make_tokens(1, 17))
    cfg = model.config
    assert feats.v2.shape == (1, cfg.dim_v2, 60, 60)
    assert feats.v3.shape == (1, cfg.dim_v3, 30, 30)
    assert feats.v4.shape == (1, cfg.dim_v4, 15, 15)
    if model.backbone.image_encoder.proj_vg is not None:  # only models that read F_vg build it
        assert feats.vg.shape == (1, cfg.dim_v4)
    else:
        assert feats.vg is None
    assert out["logits"].shape == (1, 1, 120, 120) and torch.isfinite(out["logits"]).all()
    if "query_masks" in out:
        assert out["query_masks"].shape == (1, cfg.num_queries, 120, 120)
