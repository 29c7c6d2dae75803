"""Recipes are data and the lr schedule is a pure function of the step."""

from __future__ import annotations

import dataclasses

import pytest

from refbench.errors import RefbenchError
from refbench.train.recipes import RECIPES, get_lr, get_recipe, recipe_lr


def test_paper_recipe_matches_section_4_1():
    r = RECIPES["paper"]
    assert (r.lr, r.batch_size, r.epochs, r.lr_power, r.lr_milestones) == (1e-5, 64, 100, 0.9, ())
    assert r.pretrained == "openai" and r.variant == "rn101" and r.image_size == 480
    assert r.weight_decay == 0.0 and r.warmup_steps == 0  # plain Adam, polynomial decay
    # "1e-5" read as CRIS's base_lr: CLIP encoders at lr_multi 0.1, their positional embeddings at the base lr
    assert r.backbone_lr_scale == 0.1 and r.backbone_lr_exempt == ("positional_embedding",)
    assert r.protocol == "cris"  # trained on CRIS's preprocessing, validated under CRIS's chain
    assert get_recipe("paper", backbone_lr_scale=1.0).backbone_lr_scale == 1.0  # the other reading: one flag


def test_cris_recipe_is_cris_refcoco_config():
    # CRIS.pytorch config/refcoco/cris_r50.yaml + train.py: input 416, Adam wd 0, base_lr 1e-4,
    # lr_multi 0.1 (positional embeddings excepted), MultiStepLR [35] x0.1 of 50 epochs, batch 64,
    # max_norm 0, fp16 autocast with GradScaler
    r = RECIPES["cris"]
    assert (r.image_size, r.epochs, r.batch_size, r.lr, r.backbone_lr_scale) == (416, 50, 64, 1e-4, 0.1)
    assert r.lr_milestones == (0.7,) and r.lr_decay == 0.1 and r.weight_decay == 0.0
    assert r.backbone_lr_exempt == ("positional_embedding",) and r.grad_clip is None and r.amp == "fp16"
    assert r.warmup_steps == 0 and r.pretrained == "openai" and r.protocol == "cris"
    from refbench.data import text

    assert text.context_length("refcoco") == 17 and text.context_length("refcocog") == 22  # CRIS word_len


def test_multistep_schedule_as_cris():
    r = RECIPES["cris"]
    total = 50 * 10  # 50 epochs of 10 steps: the drop comes at epoch 35
    lrs = [recipe_lr(r, s, total) for s in range(total)]
    assert lrs[0] == lrs[349] == pytest.approx(1e-4)
    assert lrs[350] == lrs[-1] == pytest.approx(1e-5)


def test_every_recipe_field_is_set_and_overrides_apply():
    for r in RECIPES.values():
        assert {f.name for f in dataclasses.fields(r)} == set(dataclasses.asdict(r))
    r = get_recipe("tiny", lr=0.5, epochs=None, steps=7)
    assert r.lr == 0.5 and r.steps == 7 and r.epochs == RECIPES["tiny"].epochs
    with pytest.raises(RefbenchError, match="unknown recipe 'nope'"):
        get_recipe("nope")


def test_polynomial_decay_without_warmup():
    assert get_lr(0, 100, 1e-5) == pytest.approx(1e-5)
    assert get_lr(50, 100, 1e-5, power=0.9) == pytest.approx(1e-5 * 0.5**0.9)
    assert get_lr(100, 100, 1e-5) == 0.0
    assert get_lr(250, 100, 1e-5) == 0.0  # past the end stays at the floor
    lrs = [get_lr(s, 100, 1.0) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone non-increasing


def test_warmup_then_decay_with_floor():
    assert get_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert get_lr(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert get_lr(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert get_lr(99, 100, 1.0, warmup_steps=10, min_lr=0.01) >= 0.01
    assert get_lr(37, 100, 1.0, 10, 0.9, 0.0) == get_lr(37, 100, 1.0, 10, 0.9, 0.0)  # pure
