"""A language-blind control: the same CLIP image encoder, a neck and a mask head; no text.

It accepts the tokens (so it fits the model contract and every harness path) and ignores
them. Its score on a split is how much of that split can be solved without reading the
sentence: a salient-object prior. The text tower is not built, so it has no text weights.
Neck: EAVL's Fusion Neck in its text-free form (eq 6); head: the fixed-kernel mask head of
EAVL's Table 3 baseline. Output logits [B,1,H/4,W/4]; loss as CRIS/EAVL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import ModelSpec
from .blocks import FusionNeck, fixed_mask_head, head_kernel, mask_bce_loss
from .clip_backbone import BackboneConfig, ClipBackbone, make_variants


@dataclass
class BlindConfig(BackboneConfig):
    dim: int = 128  # neck width C; the head works at C/2 (full variants: 512)


class Blind(nn.Module):
    """forward(image [B,3,H,W], tokens [B,L] (ignored)) -> {"logits": [B,1,H/4,W/4], "kernel": [B,9C/2+1]}."""

    threshold = 0.35  # on sigmoid(logits), as the CLIP models

    def __init__(self, cfg: BlindConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.loss_resolution = cfg.loss_resolution
        self.backbone = ClipBackbone(cfg, text=False, global_vision=False)  # image features only, no F_vg
        self.neck = FusionNeck(cfg.dim_v2, cfg.dim_v3, cfg.dim_v4, None, cfg.dim)
        self.head = fixed_mask_head(cfg.dim)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        vis, _ = self.backbone(image)
        logits = self.head(self.neck(vis.v2, vis.v3, vis.v4))
        return {"logits": logits, "kernel": head_kernel(self.head[-1], image.shape[0])}  # one learned kernel for all

    def loss(self, out: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return mask_bce_loss(out["logits"], mask, self.loss_resolution)


SPEC = ModelSpec(
    name="blind",
    config=BlindConfig,
    variants=make_variants(dict(dim=128), dict(dim=512)),
    build=Blind,
    description="language-blind control: CLIP image encoder + neck + mask head, ignores the text",
)
