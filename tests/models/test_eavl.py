"""EAVL unit tests: the equations' invariants on the tiny variant (models/eavl.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from refbench import models
from refbench.models.blocks import dynamic_conv
from _harness import torch_threads
from _model_helpers import make_tokens
from refbench.models.clip_backbone import BACKBONES

S = BACKBONES["tiny"]["image_size"]  # the tiny variant's input size


@pytest.fixture(scope="module")
def eavl():
    torch.manual_seed(0)
    return models.build("eavl", "tiny").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_dynamic_conv_equals_per_sample_loop(scale):
    g = torch.Generator().manual_seed(0)
    b, k, cp, h, w = 3, 5, 4, 9, 11
    features = torch.randn(b, cp, h, w, generator=g)
    params = torch.randn(b, k, 9 * cp + 1, generator=g)
    batched = dynamic_conv(features, params, scale=scale)
    for i in range(b):
        weight = params[i, :, :-1].reshape(k, cp, 3, 3) * scale  # the kernel scaled, the bias not
        expected = F.conv2d(features[i : i + 1], weight, params[i, :, -1], padding=1)[0]
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-5)


def test_outputs_and_estimator_weights(eavl, images):
    tokens = make_tokens(3, 17)
    with torch.no_grad():
        out = eavl(images, tokens)
    nq = eavl.config.num_queries
    assert out["logits"].shape == (3, 1, S // 4, S // 4)
    assert out["query_masks"].shape == (3, nq, S // 4, S // 4)
    weights = out["query_weights"]
    assert weights.shape == (3, nq) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    # eq 14: the output is the weighted sum of the per-query masks
    torch.testing.assert_close(out["logits"][:, 0], (weights[:, :, None, None] * out["query_masks"]).sum(1))


def test_padded_words_get_zero_attention(eavl, images):
    tokens = make_tokens(3, 22)
    with torch.no_grad():
        attention = eavl(images, tokens)["word_attention"]  # [B,Nq,L]
    pad = (tokens == 0)[:, None, :].expand_as(attention)
    assert pad.any() and (~pad).any()
    assert (attention[pad] == 0).all()
    assert (attention[~pad] > 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))


def test_samples_do_not_depend_on_their_batch(eavl, images):
    tokens = make_tokens(3, 17)
    with torch.no_grad():
        together = eavl(images, tokens)["logits"]
        alone = torch.cat([eavl(images[i : i + 1], tokens[i : i + 1])["logits"] for i in range(3)])
    # float32 kernels may sum in another order for another batch size: a small tolerance,
    # against logits whose spread is far larger
    torch.testing.assert_close(together, alone, rtol=1e-3, atol=1e-3)
    assert together.std() > 0.05


def test_sentence_changes_the_output(eavl, images):
    with torch.no_grad():
        a = eavl(images[:1], make_tokens(1, 17, seed=1))["logits"]
        b = eavl(images[:1], make_tokens(1, 17, seed=2))["logits"]
    assert (a - b).abs().max() > 1e-4


def test_padding_length_does_not_change_the_output(eavl, images):
    """The same sentence padded to 17 or 22 tokens gives the same mask (padding is ignored)."""
    t17 = make_tokens(2, 17)
    t22 = torch.cat([t17, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(eavl(images[:2], t17)["logits"], eavl(images[:2], t22)["logits"], rtol=1e-4, atol=1e-4)


def test_without_estimator_output_is_the_sum_of_masks(images):
    torch.manual_seed(0)
    model = models.build("eavl", "tiny", estimator=False, num_queries=6).eval()
    with torch.no_grad():
        out = model(images[:2], make_tokens(2, 17))
    assert torch.equal(out["query_weights"], torch.ones(2, 6))
    torch.testing.assert_close(out["logits"][:, 0], out["query_masks"].sum(1))


ABLATIONS = [
    dict(num_queries=1),
    dict(num_queries=8),
    dict(num_queries=32),
    dict(aligner="fixed"),
    dict(aligner="fixed", num_queries=8),
    dict(global_vision=False),
    dict(estimator=False),
    dict(global_vision=False, estimator=False),
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_builds_trains_and_runs(overrides, images):
    torch.manual_seed(0)
    model = models.build("eavl", "tiny", **overrides)
    out = model(images[:2], make_tokens(2, 17))
    loss = model.loss(out, torch.ones(2, 1, S, S))["loss"]
    loss.backward()
    assert out["logits"].shape == (2, 1, S // 4, S // 4) and torch.isfinite(loss)
    if overrides.get("aligner") == "fixed":
        assert "query_masks" not in out
    else:
        assert out["query_masks"].shape[1] == overrides.get("num_queries", 24)
    if overrides.get("global_vision") is False:
        assert model.query_generator.w_vg is None
    # the queries reach the loss in every variant (through the decoder at least)
    assert model.query_generator.w_tv[0].weight.grad.abs().sum() > 0  # Linear of sigma(F_tv W_tv)


def test_bad_input_is_one_clear_error(eavl):
    with pytest.raises(models.ModelError, match=f"{S}x{S}"):
        eavl(torch.randn(1, 3, S + 32, S + 32), make_tokens(1, 17))
    with pytest.raises(models.ModelError, match="aligner"):
        models.build("eavl", "tiny", aligner="sparse")
    with pytest.raises(models.ModelError, match="context"):
        eavl(torch.randn(1, 3, S, S), make_tokens(1, 80))


def _logits_and_one_adam_step(scaled: bool, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fresh tiny EAVL (seed 0) before and after one AdamW step at lr 1e-3."""
    torch.manual_seed(0)
    net = models.build("eavl", "tiny", scaled_kernels=scaled, norm="group")  # the head the measurement was made on
    tokens = make_tokens(len(images), 17)
    mask = (torch.rand(len(images), 1, S, S, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    with torch.no_grad():
        before = net.eval()(images, tokens)["logits"]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train().loss(net(images, tokens), mask)["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        after = net.eval()(images, tokens)["logits"]
    return before, after


def test_scaled_kernels_keep_the_logits_and_adam_steps_small(images):
    """Why eq 12's kernels are divided by sqrt(9 C_p) (module docstring): unscaled, W_p sits
    behind two fan-ins, so the initial logits have a std of ~5 and one Adam step, which moves
    every weight by about lr, shifts them by ~10 on average (0.3 and ~2 scaled; quickstart
    testB batch, seeds 0-4). The masks' correlation does not change: only their scale does."""
    with torch_threads(1):
        unscaled = _logits_and_one_adam_step(False, images)
        scaled = _logits_and_one_adam_step(True, images)
    assert unscaled[0].std() > 2.0 and scaled[0].std() < 1.0, (unscaled[0].std(), scaled[0].std())
    move_unscaled, move_scaled = ((a - b).abs().mean() for b, a in (unscaled, scaled))
    assert move_unscaled > 4.0 and move_scaled < 3.0 and move_unscaled > 3 * move_scaled, (move_unscaled, move_scaled)
