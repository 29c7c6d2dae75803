"""The model contract and the registry functions.

Every registered model is described by a `ModelSpec`: a flat config dataclass (every field
commented), its variants as data (field overrides, never if-branches on names), and a build
function. A built model is an `nn.Module` with:

    image_size: int        # square network input, pixels (e.g. 480; 128 for "tiny")
    threshold: float       # binarisation threshold on sigmoid(logits)
    config                 # the config dataclass instance it was built from

    forward(image: float[B,3,H,W], tokens: int[B,L]) -> {"logits": float[B,1,h,w], ...extras}
        L is any length up to 77 (17 / 22 in practice); token id 0 is padding and the EOT token
        is the largest id in each row. forward is identical in training and evaluation.
    loss(out: dict, mask: float[B,1,H,W]) -> {"loss": scalar, ...named terms}

A model that needs to be rebuilt (checkpoint loading) is rebuilt with
`build(name, variant, **dataclasses.asdict(config))`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable


class ModelError(Exception):
    """A user-facing model error (unknown name/variant/field, weights unavailable): one line."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, e.g. "eavl"
    config: type  # flat dataclass type; every field has a default and a comment
    variants: dict[str, dict]  # variant name -> field overrides, e.g. {"tiny": {...}, "rn50": {...}}
    build: Callable[[Any], Any]  # config instance -> nn.Module honouring the contract
    description: str = ""  # one line for `refbench models`


def names() -> list[str]:
    """Registered model names, sorted; imports nothing heavy."""
    from . import MODELS

    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Import and return the spec of a registered model."""
    from . import MODELS

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
