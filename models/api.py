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
        An optional extra "kernel": float[B,P] is the kernel that scores the pixels (a generated
        one, or a fixed head's learned one repeated); refbench.eval.sensitivity reports how much it
        changes with the sentence.
        An optional extra "nt_logit": float[B] is a no-target head's decision for generalized RIS
        (gRefCOCO, refbench.eval.gres_metrics): the sentence refers to nothing when nt_logit > 0 (ReLA's
        argmax over its two no-target logits is nt_logit = logit[1] - logit[0] > 0). A model
        without one is read as "no target" when its binarised mask is empty.
    loss(out: dict, mask: float[B,1,H,W], no_target: bool[B] | None = None) -> {"loss": scalar, ...named terms}
        mask is empty (all 0) for a gRefCOCO no-target sentence: no loss may divide by the
        target area. `no_target` (optional parameter; the training loop passes it only to a loss
        whose signature names it, `loss_terms`) is the per-sample no-target flag that a
        no-target head trains on; None means every sample has a target (RefCOCO).

A model that needs to be rebuilt (checkpoint loading) is rebuilt with
`build(name, variant, **dataclasses.asdict(config))` (refbench.models.registry). A field added
after checkpoints were written with a default that changes the model names, in the spec's
`absent_means`, the value those older configs meant (EAVL: `scaled_kernels=False`), so an
older checkpoint rebuilds as it was trained, not with the new default.

Config overrides (`--set FIELD=VALUE`) are checked before anything is built, against the
field's annotation: an `int` field takes an integer >= 1 (config ints are sizes and counts), a
`float` a finite number, a `bool` True/False (or true/false), a `str` a string, `X | None` also
None. A config may narrow or widen a field's range with a class attribute
`LIMITS: ClassVar[dict] = {"field": (low, high)}` (inclusive; None = unbounded). A build that
fails on overridden values (e.g. heads that do not divide the width) is a `ModelError` naming them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
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
    absent_means: dict[str, Any] = field(default_factory=dict)  # config field added later -> what a saved config without it meant (a checkpoint keeps its behaviour)


def loss_terms(net: Any, out: dict, mask: Any, no_target: Any = None) -> dict:
    """`net.loss(out, mask)`, with `no_target=` passed when the loss takes it (a parameter of that
    name, or **kwargs): models written before the flag existed keep their two-argument loss."""
    params = inspect.signature(net.loss).parameters
    if "no_target" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return net.loss(out, mask, no_target=no_target)
    return net.loss(out, mask)
