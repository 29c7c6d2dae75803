"""Model zoo for refbench: one lazy registry, one contract.

`MODELS` maps a name to "module:attribute" of its `ModelSpec`; nothing is imported until a
model is asked for, so listing names costs no torch import. Adding a model is one file in this
package and one line here; the shared contract test (tests/test_models_contract.py) then
covers it. This package never imports the rest of refbench (only its own modules, relatively).

    >>> from refbench import models
    >>> models.names()
    ['blind', 'cris', 'eavl']
    >>> net = models.build("eavl", variant="tiny", num_queries=8)
"""

from __future__ import annotations

from .api import ModelError, ModelSpec, build, get_spec, make_config, names

MODELS: dict[str, str] = {
    "eavl": "refbench.models.eavl:SPEC",  # EAVL (Yan et al. 2023): multi-query dynamic-kernel aligner
    "cris": "refbench.models.cris:SPEC",  # CRIS (Wang et al. 2022): CLIP-driven, one sentence kernel
    "blind": "refbench.models.blind:SPEC",  # language-blind control: sees the image only
}

__all__ = ["MODELS", "ModelError", "ModelSpec", "build", "get_spec", "make_config", "names"]
