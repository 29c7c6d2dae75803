"""CRIS (Wang et al. 2022, "CLIP-Driven Referring Image Segmentation"), the baseline EAVL builds on.

On the shared CLIP backbone (models/clip_backbone.py), CRIS's three parts:
- an FPN-style neck that multiplies the stride-32 map by the sentence feature F_tg and fuses
  down to one stride-16 map with coordinate features (CRIS's `FPN`);
- a vision-language decoder (3 layers): vision tokens attend to themselves and to the words
  F_t (sine positions on both sides, padded words masked);
- the text-to-pixel contrastive projector: the pixel map goes up to stride 4 ("UCUCP") and the
  sentence feature becomes ONE 3x3 dynamic kernel + bias that scores every pixel.
Output logits [B,1,H/4,W/4]; loss: binary cross-entropy against the mask resized (nearest)
to H/4, as CRIS. The blocks (conv block, coordinate conv, decoder layers, projector, dynamic
conv) are the ones EAVL uses (models/blocks.py). Differences from CRIS's code: GroupNorm
instead of BatchNorm (batch-independent outputs), and the stride-32 input is the shared
backbone's F_v4 (dense attention pool + projection) without CRIS's extra 1x1 residual
around the attention pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import ModelSpec
from .blocks import (
    CoordConv,
    VisionLanguageDecoder,
    conv_block,
    dynamic_conv,
    mask_bce_loss,
    norm_groups,
    pixel_upsampler,
    sine_pos_1d,
)
from .clip_backbone import BackboneConfig, ClipBackbone, ImageFeatures, make_variants


@dataclass
class CRISConfig(BackboneConfig):
    dim_f3: int = 64  # neck width at stride 8 (CRIS fpn_out[0]: 256)
    dim: int = 128  # neck output and decoder width (CRIS fpn_out[1] = vis_dim: 512)
    dim_f5: int = 256  # neck width at stride 32, times the sentence (CRIS fpn_out[2]: 1024)
    heads: int = 4  # decoder attention heads (CRIS: 8)
    ffn: int = 256  # decoder feed-forward width (CRIS: 2048)
    layers: int = 3  # decoder layers (CRIS: 3)
    dropout: float = 0.0  # decoder dropout (full variants: CRIS's 0.1)


SMALL_HEAD = dict(dim_f3=64, dim=128, dim_f5=256, heads=4, ffn=256, layers=3, dropout=0.0)  # tiny, tiny-vit
FULL_HEAD = dict(dim_f3=256, dim=512, dim_f5=1024, heads=8, ffn=2048, layers=3, dropout=0.1)  # CRIS configs


class CRISNeck(nn.Module):
    """CRIS's FPN: sentence-gated stride-32 map fused with strides 16 and 8 -> [B,dim,H/16,W/16]."""

    def __init__(self, cfg: CRISConfig, dim_sentence: int):
        super().__init__()
        f3, f4, f5 = cfg.dim_f3, cfg.dim, cfg.dim_f5
        self.txt_proj = nn.Sequential(nn.Linear(dim_sentence, f5), nn.ReLU(inplace=True))
        self.v5_proj = conv_block(cfg.dim_v4, f5, 1)
        self.v5_norm = nn.Sequential(nn.GroupNorm(norm_groups(f5), f5), nn.ReLU(inplace=True))
        self.v4_proj = conv_block(cfg.dim_v3, f4, 3)
        self.f4_cat = conv_block(f5 + f4, f4, 1)
        self.v3_proj = conv_block(cfg.dim_v2, f3, 3)
        self.f3_cat = conv_block(f3 + f4, f4, 1)
        self.out5, self.out4, self.out3 = conv_block(f5, f4, 3), conv_block(f4, f4, 3), conv_block(f4, f4, 3)
        self.aggregate = conv_block(3 * f4, f4, 1)
        self.coord = nn.Sequential(CoordConv(f4, f4), conv_block(f4, f4, 3))

    def forward(self, vis: ImageFeatures, sentence: torch.Tensor) -> torch.Tensor:
        state = self.txt_proj(sentence)[:, :, None, None]  # [B,f5,1,1]
        f5 = self.v5_norm(self.v5_proj(vis.v4) * state)  # [B,f5,H/32,W/32]
        f5_up = F.interpolate(f5, size=vis.v3.shape[-2:], mode="bilinear", align_corners=False)
        f4 = self.f4_cat(torch.cat([self.v4_proj(vis.v3), f5_up], dim=1))  # [B,f4,H/16,W/16]
        f3 = F.avg_pool2d(self.v3_proj(vis.v2), 2, 2)  # [B,f3,H/16,W/16]
        f3 = self.f3_cat(torch.cat([f3, f4], dim=1))  # [B,f4,H/16,W/16]
        q5 = F.interpolate(self.out5(f5), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        fq = self.aggregate(torch.cat([self.out3(f3), self.out4(f4), q5], dim=1))  # [B,f4,H/16,W/16]
        return self.coord(fq)


class CRIS(nn.Module):
    """CRIS on a CLIP backbone: forward(image [B,3,H,W], tokens [B,L]) -> {"logits": [B,1,H/4,W/4]}."""

    threshold = 0.35  # on sigmoid(logits), as CRIS

    def __init__(self, cfg: CRISConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.loss_resolution = cfg.loss_resolution
        self.backbone = ClipBackbone(cfg, global_vision=False)  # CRIS never reads F_vg
        dim_words, dim_sentence = self.backbone.dim_words, self.backbone.dim_sentence
        self.neck = CRISNeck(cfg, dim_sentence)
        self.word_proj = nn.Linear(dim_words, cfg.dim) if dim_words != cfg.dim else nn.Identity()
        self.decoder = VisionLanguageDecoder(cfg.layers, cfg.dim, cfg.heads, cfg.ffn, cfg.dropout)
        cp = cfg.dim // 2
        self.pixel = pixel_upsampler(cfg.dim, cp, "UCUCP")  # stride 16 -> 4
        self.sentence_kernel = nn.Linear(dim_sentence, 9 * cp + 1)  # F_tg -> 3x3 x Cp kernel + bias

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        vis, text = self.backbone(image, tokens)
        fq = self.neck(vis, text.sentence)  # [B,C,H/16,W/16]
        words = self.word_proj(text.words)  # [B,L,C]
        pos = sine_pos_1d(words.shape[-1], words.shape[1], words.device).to(words.dtype)  # [L,C]
        fq = self.decoder(fq, words, pos, text.pad)  # [B,C,H/16,W/16]
        kernel = self.sentence_kernel(text.sentence)[:, None, :]  # [B,1,9Cp+1]
        return {"logits": dynamic_conv(self.pixel(fq), kernel)}  # [B,1,H/4,W/4]

    def loss(self, out: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return mask_bce_loss(out["logits"], mask, self.loss_resolution)


SPEC = ModelSpec(
    name="cris",
    config=CRISConfig,
    variants=make_variants(SMALL_HEAD, FULL_HEAD),
    build=CRIS,
    description="CRIS (Wang et al. 2022): sentence-gated FPN, word decoder, one sentence kernel",
)
