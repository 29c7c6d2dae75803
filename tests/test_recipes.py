"""Recipes are data and the lr schedule is a pure function of the step."""

from __future__ import annotations

import dataclasses

import pytest

from refbench.errors import RefbenchError
from refbench.recipes import RECIPES, get_lr, get_recipe


def test_paper_recipe_matches_section_4_1():
    r = RECIPES["paper"]
    assert (r.lr, r.batch_size, r.epochs, r.lr_power) == (1e-5, 64, 100, 0.9)
    assert r.pretrained == "openai" and r.variant == "rn101"
    assert r.weight_decay == 0.0 and r.warmup_steps == 0  # plain Adam, polynomial decay


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
