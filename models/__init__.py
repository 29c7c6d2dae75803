"""Model zoo for refbench: one lazy registry, one contract.

`MODELS` (registry.py) maps a name to "module:attribute" of its `ModelSpec`; nothing is imported
until a model is asked for, so listing names costs no torch import. Adding a model is one file in
this package and one line in registry.py (the shared contract test, tests/models/test_models_contract.py,
then covers it); a model in another package plugs in through the `refbench.models` entry-point
group or as a `module:SPEC` name. This package never imports the rest of refbench (only its own
modules, relatively).

    >>> from refbench import models
    >>> models.names()
    ['blind', 'cris', 'eavl']
    >>> net = models.build("eavl", variant="tiny", num_queries=8)
"""

from __future__ import annotations

from .api import ModelError, ModelSpec
from .registry import (BUILTIN, ENTRY_POINT_GROUP, MODELS, build, get_spec, make_config, names, origin, register,
                       target_of, variant_names)

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "MODELS", "ModelError", "ModelSpec", "build", "get_spec", "make_config",
           "names", "origin", "register", "target_of", "variant_names"]
