"""The lazy model registry: names -> "module:SPEC", imported only when a model is asked for.

`MODELS` maps a name to "module:attribute" of its `ModelSpec`; nothing is imported until a
model is asked for, so listing names costs no torch import.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .api import ModelError, ModelSpec

MODELS: dict[str, str] = {
    "eavl": "refbench.models.eavl:SPEC",  # EAVL (Yan et al. 2023): multi-query dynamic-kernel aligner
    "cris": "refbench.models.cris:SPEC",  # CRIS (Wang et al. 2022): CLIP-driven, one sentence kernel
    "blind": "refbench.models.blind:SPEC",  # language-blind control: sees the image only
}


def names() -> list[str]:
    """Registered model names, sorted; imports nothing heavy."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Import and return the spec of a registered model."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    module_name, attr = MODELS[name].split(":")
    spec = getattr(importlib.import_module(module_name), attr)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{MODELS[name]} is not a ModelSpec")
    return spec


def make_config(name: str, variant: str = "tiny", **overrides: Any) -> Any:
    """The config of `name` for `variant`, with `overrides` applied on top of the variant."""
    spec = get_spec(name)
    if variant not in spec.variants:
        raise ModelError(
            f"model {name!r} has no variant {variant!r}; variants: {', '.join(spec.variants)}"
        )
    fields = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelError(
            f"model {name!r} has no config field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}"
        )
    return spec.config(**{**spec.variants[variant], **overrides})


def build(name: str, variant: str = "tiny", **overrides: Any) -> Any:
    """Build a registered model: `build("eavl", "tiny", num_queries=8)`."""
    spec = get_spec(name)
    config = make_config(name, variant, **overrides)
    model = spec.build(config)
    model.config = config
    model.model_name = name
    model.variant = variant
    return model
