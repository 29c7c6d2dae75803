"""The lazy model registry: names -> "module:SPEC", imported only when a model is asked for.

`MODELS` maps a name to "module:attribute" of its `ModelSpec`; nothing is imported until a
model is asked for, so listing names costs no torch import.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
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
    overrides = {k: check_field(spec, k, v) for k, v in overrides.items()}
    return spec.config(**{**spec.variants[variant], **overrides})


def _limits(config: type) -> dict[str, tuple]:
    limits: dict[str, tuple] = {}
    for klass in reversed(config.__mro__):
        limits.update(vars(klass).get("LIMITS", {}))
    return limits


def check_field(spec: ModelSpec, key: str, value: Any) -> Any:
    """`value` for config field `key` of `spec`, checked against its type and range (ModelError if
    it does not fit; "true"/"false" become booleans for a bool field)."""
    hint = typing.get_type_hints(spec.config)[key]
    options = [a for a in typing.get_args(hint)] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    where = f"model {spec.name!r} config field {key}"
    if value is None:
        if type(None) in options:
            return value
        raise ModelError(f"{where} cannot be None")
    kinds = [t for t in options if t is not type(None)]
    if bool in kinds and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    ok = any((t is int and isinstance(value, int) and not isinstance(value, bool))
             or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
             or (t is bool and isinstance(value, bool))
             or (t not in (int, float, bool) and isinstance(value, t))
             for t in kinds if isinstance(t, type))
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in kinds)
        raise ModelError(f"{where} takes {'an' if names[0] in 'aeiou' else 'a'} {names}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelError(f"{where} must be a finite number, not {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = _limits(spec.config).get(key, (1, None) if int in kinds and float not in kinds else (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            span = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ModelError(f"{where} must be {span}, not {value!r}")
    return value


def build(name: str, variant: str = "tiny", **overrides: Any) -> Any:
    """Build a registered model: `build("eavl", "tiny", num_queries=8)`."""
    spec = get_spec(name)
    config = make_config(name, variant, **overrides)
    try:
        model = spec.build(config)
    except (ValueError, AssertionError, RuntimeError, TypeError, ZeroDivisionError) as e:
        changed = {k: v for k, v in overrides.items() if spec.variants[variant].get(k, getattr(spec.config, k, None)) != v}
        if not changed or "pretrained" in changed and len(changed) == 1:
            raise
        sets = " ".join(f"--set {k}={v!r}" for k, v in changed.items())
        raise ModelError(f"model {name!r} ({variant}) cannot be built with {sets}: "
                         f"{' '.join(str(e).split())[:200] or type(e).__name__}") from None
    model.config = config
    model.model_name = name
    model.variant = variant
    return model
