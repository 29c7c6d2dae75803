"""The lazy model registry: names -> "module:SPEC", imported only when a model is asked for.

Three sources, one table (`MODELS`), nothing imported until a model is asked for, so listing
names costs no torch import:

    built in      the models of this package (`BUILTIN`)
    entry points  group `refbench.models` of any installed distribution, name -> "module:SPEC",
                  e.g. in the plug-in's pyproject.toml:
                      [project.entry-points."refbench.models"]
                      mynet = "mypkg.net:SPEC"
    module:SPEC   given where a model name is expected (`refbench train mypkg.net:SPEC`), or
                  `register(name, "module:SPEC")` at run time

`origin(name)` says where a name came from. A plug-in that fails to import raises one
`ModelError` line naming it when it is asked for; the others are unaffected.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from importlib import metadata
from typing import Any

from .api import ModelError, ModelSpec

ENTRY_POINT_GROUP = "refbench.models"  # where third-party packages declare their models

BUILTIN: dict[str, str] = {
    "eavl": "refbench.models.eavl:SPEC",  # EAVL (Yan et al. 2023): multi-query dynamic-kernel aligner
    "cris": "refbench.models.cris:SPEC",  # CRIS (Wang et al. 2022): CLIP-driven, one sentence kernel
    "blind": "refbench.models.blind:SPEC",  # language-blind control: sees the image only
}

MODELS: dict[str, str] = dict(BUILTIN)  # name -> "module:SPEC": built in, then entry points, then register()
_ORIGINS: dict[str, str] = {name: "built in" for name in BUILTIN}  # name -> where it came from, in words
_discovered = False


def _discover() -> None:
    """Add the `refbench.models` entry points of installed distributions (once per process)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an installed package"
        if ep.name in BUILTIN:
            _ORIGINS[ep.name] = f"built in (entry point of {dist} ignored: the name is taken)"
            continue
        MODELS.setdefault(ep.name, ep.value)
        _ORIGINS.setdefault(ep.name, f"entry point of {dist}")


def register(name: str, target: str) -> None:
    """Register `name` -> "module:SPEC" for this process (a plug-in without packaging, or a test)."""
    _check_target(target)
    _discover()
    MODELS[name] = target
    _ORIGINS[name] = "registered at run time"


def names() -> list[str]:
    """Registered model names (built in, entry points, run time), sorted; imports nothing heavy."""
    _discover()
    return sorted(MODELS)


def origin(name: str) -> str:
    """Where `name` comes from: "built in", "entry point of <dist> <version>", ..."""
    _discover()
    if name in _ORIGINS:
        return _ORIGINS[name]
    if ":" in name:
        return "module:SPEC name"
    raise ModelError(f"unknown model {name!r}; registered models: {', '.join(names())}")


def target_of(name: str) -> str:
    """The "module:SPEC" a name resolves to (a `module:SPEC` name is its own target)."""
    _discover()
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        _check_target(name)
        return name
    raise ModelError(f"unknown model {name!r}; registered models: {', '.join(names())} "
                     f"(or a plug-in as module:SPEC)")


def _check_target(target: str) -> None:
    module, sep, attr = target.partition(":")
    if not (module and sep and attr):
        raise ModelError(f"{target!r} is not a model reference of the form module:SPEC (e.g. mypkg.net:SPEC)")


def get_spec(name: str) -> ModelSpec:
    """Import and return the spec of a model name (registered, entry point or module:SPEC)."""
    target = target_of(name)
    module_name, _, attr = target.partition(":")
    where = "" if name == target else f" ({origin(name)}: {target})"
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a broken plug-in is named in one line, whatever it raised
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"model {name!r}{where} failed to import: {type(e).__name__}: {reason}") from None
    spec = getattr(module, attr, None)
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"model {name!r}{where}: {target} is not a refbench ModelSpec")
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
def variant_names(model: str | None = None) -> list[str]:
    """The variants of `model`, or of every registered model that imports (for CLI choices)."""
    if model is not None:
        return list(get_spec(model).variants)
    found: dict[str, None] = {}
    for name in names():
        try:
            found.update(dict.fromkeys(get_spec(name).variants))
        except ModelError:
            continue  # a broken plug-in does not hide the others' variants
    return list(found)


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
