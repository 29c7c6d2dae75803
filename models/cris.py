"""CRIS (Wang et al. 2022, "CLIP-Driven Referring Image Segmentation"), the baseline EAVL builds on.

Layer for layer the model of CRIS.pytorch (model/segmenter.py, model/layers.py, model/clip.py;
HEAD e596332), so its checkpoints load (`CRIS_KEY_RULES`, `refbench convert cris`) and, in
eval mode, give the same logits within float32 rounding (tests/models/test_cris_parity.py):
- image (ResNet backbones): CLIP's ModifiedResNet; the stage-2 and stage-3 maps as they are
  (no projection) and stage 4 through CRIS's attention pool (`cris_attention_pool`: every
  position a query, NO prepended mean token, the positional embedding's grid resized
  bicubically, a residual `connect` branch of 1x1 conv + BatchNorm added, then ReLU:
  `cris_attention_pool`);
- text: CLIP's transformer; F_t = every token after ln_final (width Ct), F_tg = the EOT token
  through the text projection;
- neck (CRIS's `FPN`, the same attribute names): the stride-32 map times the projected
  sentence (`txt_proj` = Linear without bias + BatchNorm1d + ReLU), BatchNorm + ReLU, fused
  with strides 16 and 8 down to one stride-16 map with coordinate features;
- decoder: 3 `blocks.DecoderLayer`s (CRIS's TransformerDecoderLayer: pre-norms, a LayerNorm on
  each attention output, a LayerNorm inside the FFN), 2-D sine positions on the vision tokens
  and 1-D sine positions on the word keys, padded words masked, a final LayerNorm;
- projector: the pixel map goes up to stride 4 ("UCUCP") and the sentence feature becomes ONE
  3x3 dynamic kernel + bias that scores every pixel.
Output logits [B,1,H/4,W/4]; loss: binary cross-entropy against the mask resized (nearest)
to H/4, as CRIS (soft targets from CRIS's preprocessing are fine).

Deliberate differences, each a config switch or outside CRIS's code:
- gRefCOCO (generalized RIS; CRIS has one target per sentence): a no-target sentence's mask is
  empty and the BCE is a mean over pixels (no division by the target area). `nt_head=True` adds
  a no-target head as ReLA has, in a simpler reading (blocks.NoTargetHead): the decoder output
  (stride 16, vision and words fused), mean-pooled, through an MLP (C, C, 1) to `nt_logit`
  (> 0: no target), BCE at weight `nt_weight` (1.0, our choice; ReLA's per-query 2-class CE with
  weights [0.9, 1.1] is not reproduced). Without it, "no target" = an empty binarised mask.
- `norm="group"` swaps every BatchNorm of the head for GroupNorm (and drops the sentence
  projection's BatchNorm1d): batch-independent outputs, but no longer CRIS's weights.
- ViT backbones (tiny-vit, vitb16, vitl14): CRIS's code has no ViT path; the shared ViT adapter
  (models/clip_backbone.py) gives the three maps, and words are projected to the decoder width
  when the text width differs (ViT-L/14: 768 -> 512). ResNet variants have no such projection.
- Under torchrun CRIS converts BatchNorm to SyncBatchNorm (sync_bn: True); that is the
  training loop's business, not the model's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import ModelError, ModelSpec
from .blocks import (
    CoordConv,
    NoTargetHead,
    VisionLanguageDecoder,
    conv_block,
    dynamic_conv,
    linear_block,
    mask_bce_loss,
    no_target_bce,
    norm_2d,
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
    norm: str = "batch"  # head normalisation: "batch" (CRIS's BatchNorm, its weights load) or "group" (GroupNorm, batch-independent)
    nt_head: bool = False  # gRefCOCO no-target head (blocks.NoTargetHead on the mean-pooled decoder output): outputs nt_logit, BCE added to the loss
    nt_weight: float = 1.0  # weight of the no-target BCE in the loss (with nt_head)


SMALL_HEAD = dict(dim_f3=64, dim=128, dim_f5=256, heads=4, ffn=256, layers=3, dropout=0.0)  # tiny, tiny-vit
FULL_HEAD = dict(dim_f3=256, dim=512, dim_f5=1024, heads=8, ffn=2048, layers=3, dropout=0.1)  # CRIS configs
# On ResNets CRIS feeds the trunk's own channels to its neck (its fpn_in): stage 2, stage 3, and
# the attention pool's output. RN50: [512, 1024, 1024], RN101: [512, 1024, 512], as its configs.
RESNET_CHANNELS = {
    "tiny": dict(dim_v2=128, dim_v3=256, dim_v4=256),
    "rn50": dict(dim_v2=512, dim_v3=1024, dim_v4=1024),
    "rn101": dict(dim_v2=512, dim_v3=1024, dim_v4=512),
}


def cris_attention_pool(pool: nn.Module, connect: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CRIS's AttentionPool2d on open_clip's pool weights: [B,C,h,w] -> [B,D,h,w].

    Every position is a query and a key (no prepended mean token); the positional embedding's
    S x S grid (its leading global slot dropped) is resized bicubically to h x w (always, as
    CRIS); the attention output plus `connect(x)` (1x1 conv without bias + BatchNorm, trained
    from scratch: not in CLIP's weights) goes through a ReLU.
    """
    b, c, h, w = x.shape
    res = connect(x)  # [B,D,h,w]
    pos = pool.positional_embedding  # [1+S*S, C]
    side = math.isqrt(pos.shape[0] - 1)
    grid = pos[-side * side :].reshape(1, side, side, c).permute(0, 3, 1, 2)  # [1,C,S,S]
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1,C,h,w]
    tokens = (x.flatten(2) + grid.flatten(2).to(x.dtype)).transpose(1, 2)  # [B,hw,C]
    heads = pool.num_heads

    def split(t):  # [B,N,C] -> [B,heads,N,C/heads]
        return t.reshape(b, -1, heads, c // heads).transpose(1, 2)

    q, k, v = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
    out = F.scaled_dot_product_attention(q, k, v)  # [B,heads,hw,C/heads]
    out = pool.c_proj(out.transpose(1, 2).reshape(b, h * w, c))  # [B,hw,D]
    return F.relu(out.transpose(1, 2).reshape(b, -1, h, w) + res)


class CRISResNetEncoder(nn.Module):
    """CRIS's image side on CLIP's ModifiedResNet: (x2, x3, pool(x4)) as F_v2, F_v3, F_v4; no F_vg."""

    def __init__(self, visual: nn.Module, cfg: BackboneConfig, global_vision: bool = False):
        super().__init__()
        if global_vision:
            raise ModelError("CRIS's image encoder has no global vision feature (F_vg)")
        self.visual = visual  # open_clip ModifiedResNet (its BatchNorm layers are CLIP's own)
        width = visual.layer1[0].conv1.in_channels  # the stem width
        got = (8 * width, 16 * width, visual.attnpool.c_proj.out_features)
        want = (cfg.dim_v2, cfg.dim_v3, cfg.dim_v4)
        if got != want:
            raise ModelError(
                f"CRIS on {cfg.clip_arch} takes the trunk's own channels {got} as (dim_v2, dim_v3, dim_v4), "
                f"the config says {want}"
            )
        embed, out_dim = visual.attnpool.k_proj.in_features, visual.attnpool.c_proj.out_features
        self.connect = nn.Sequential(nn.Conv2d(embed, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))  # CRIS's attnpool.connect

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        v = self.visual
        x = v.layer1(v.stem(image))  # [B,4w,H/4,W/4]
        x2 = v.layer2(x)  # [B,8w,H/8,W/8]
        x3 = v.layer3(x2)  # [B,16w,H/16,W/16]
        x4 = cris_attention_pool(v.attnpool, self.connect, v.layer4(x3))  # [B,D,H/32,W/32]
        return ImageFeatures(x2, x3, x4, None)  # CRIS has no global vision feature


class CRISNeck(nn.Module):
    """CRIS's FPN (its attribute names): sentence-gated stride-32 map fused with strides 16 and 8
    -> [B,dim,H/16,W/16]."""

    def __init__(self, cfg: CRISConfig, dim_sentence: int):
        super().__init__()
        f3, f4, f5, n = cfg.dim_f3, cfg.dim, cfg.dim_f5, cfg.norm
        self.txt_proj = linear_block(dim_sentence, f5, n)
        self.f1_v_proj = conv_block(cfg.dim_v4, f5, 1, n)
        self.norm_layer = nn.Sequential(norm_2d(n, f5), nn.ReLU(inplace=True))
        self.f2_v_proj = conv_block(cfg.dim_v3, f4, 3, n)
        self.f2_cat = conv_block(f5 + f4, f4, 1, n)
        self.f3_v_proj = conv_block(cfg.dim_v2, f3, 3, n)
        self.f3_cat = conv_block(f3 + f4, f4, 1, n)
        self.f4_proj5, self.f4_proj4, self.f4_proj3 = conv_block(f5, f4, 3, n), conv_block(f4, f4, 3, n), conv_block(f4, f4, 3, n)
        self.aggr = conv_block(3 * f4, f4, 1, n)
        self.coordconv = nn.Sequential(CoordConv(f4, f4, n), conv_block(f4, f4, 3, n))

    def forward(self, vis: ImageFeatures, sentence: torch.Tensor) -> torch.Tensor:
        state = self.txt_proj(sentence)[:, :, None, None]  # [B,f5,1,1]
        f5 = self.norm_layer(self.f1_v_proj(vis.v4) * state)  # [B,f5,H/32,W/32]
        f5_up = F.interpolate(f5, size=vis.v3.shape[-2:], mode="bilinear", align_corners=False)
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(vis.v3), f5_up], dim=1))  # [B,f4,H/16,W/16]
        f3 = F.avg_pool2d(self.f3_v_proj(vis.v2), 2, 2)  # [B,f3,H/16,W/16]
        f3 = self.f3_cat(torch.cat([f3, f4], dim=1))  # [B,f4,H/16,W/16]
        q5 = F.interpolate(self.f4_proj5(f5), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), q5], dim=1))  # [B,f4,H/16,W/16]
        return self.coordconv(fq)


class CRIS(nn.Module):
    """CRIS on a CLIP backbone: forward(image [B,3,H,W], tokens [B,L]) -> {"logits": [B,1,H/4,W/4],
    "kernel": [B,9Cp+1] (the sentence kernel)}."""

    threshold = 0.35  # on sigmoid(logits), as CRIS

    def __init__(self, cfg: CRISConfig):
        super().__init__()
        self.config = cfg
        self.image_size = cfg.image_size
        self.loss_resolution = cfg.loss_resolution
        self.backbone = ClipBackbone(cfg, global_vision=False, resnet_encoder=CRISResNetEncoder)  # CRIS never reads F_vg
        dim_words, dim_sentence = self.backbone.dim_words, self.backbone.dim_sentence
        self.neck = CRISNeck(cfg, dim_sentence)
        self.word_proj = nn.Linear(dim_words, cfg.dim) if dim_words != cfg.dim else nn.Identity()
        self.decoder = VisionLanguageDecoder(cfg.layers, cfg.dim, cfg.heads, cfg.ffn, cfg.dropout)
        cp = cfg.dim // 2
        self.pixel = pixel_upsampler(cfg.dim, cp, "UCUCP", cfg.norm)  # stride 16 -> 4 (CRIS's Projector.vis)
        self.sentence_kernel = nn.Linear(dim_sentence, 9 * cp + 1)  # F_tg -> 3x3 x Cp kernel + bias (Projector.txt)
        self.nt_weight = cfg.nt_weight
        self.nt_head = NoTargetHead(cfg.dim) if cfg.nt_head else None  # gRefCOCO: reads the decoder output, mean-pooled

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        vis, text = self.backbone(image, tokens)
        fq = self.neck(vis, text.sentence)  # [B,C,H/16,W/16]
        words = self.word_proj(text.words)  # [B,L,C]
        pos = sine_pos_1d(words.shape[-1], words.shape[1], words.device).to(words.dtype)  # [L,C]
        fq = self.decoder(fq, words, pos, text.pad)  # [B,C,H/16,W/16]
        kernel = self.sentence_kernel(text.sentence)  # [B,9Cp+1]
        out = {"logits": dynamic_conv(self.pixel(fq), kernel[:, None, :]), "kernel": kernel}  # [B,1,H/4,W/4]
        if self.nt_head is not None:
            out["nt_logit"] = self.nt_head(fq)  # [B]: > 0 = no target
        return out

    def loss(self, out: dict, mask: torch.Tensor, no_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = mask_bce_loss(out["logits"], mask, self.loss_resolution)  # a mean over pixels: an empty mask is fine
        return no_target_bce(terms, out, no_target, self.nt_weight) if self.nt_head is not None else terms


# CRIS.pytorch state-dict names -> ours (first matching rule wins; None = dropped). Keys of a
# CRIS checkpoint start with "module." (saved from its DDP wrapper); strip that first.
CRIS_KEY_RULES: tuple[tuple[str, str | None], ...] = (
    (r"^backbone\.logit_scale$", None),  # CLIP's contrastive temperature: unused by segmentation
    (r"^backbone\.visual\.attnpool\.connect\.", "backbone.image_encoder.connect."),
    (r"^backbone\.visual\.", "backbone.image_encoder.visual."),
    (r"^backbone\.", "backbone.text_encoder."),
    (r"^neck\.coordconv\.0\.conv1\.", "neck.coordconv.0.conv."),
    (r"^neck\.", "neck."),
    (r"^decoder\.layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^decoder\.", "decoder."),
    (r"^proj\.vis\.", "pixel."),
    (r"^proj\.txt\.", "sentence_kernel."),
)
DROPPED = object()  # `cris_key`'s answer for a CRIS key that has no counterpart on purpose


def cris_key(name: str):
    """Our state-dict key for a CRIS.pytorch key ("module." already stripped): a str, `DROPPED`,
    or None when no rule knows the key."""
    for pattern, repl in CRIS_KEY_RULES:
        if re.match(pattern, name):
            return DROPPED if repl is None else re.sub(pattern, repl, name, count=1)
    return None


# CRIS's own model is defined for its ResNet configs; the variant of a CRIS checkpoint is read
# from the number of blocks in its stage 3 (RN50: 6, RN101: 23).
CRIS_STAGE3_BLOCKS = {6: "rn50", 23: "rn101"}


def _variants() -> dict[str, dict]:
    variants = make_variants(SMALL_HEAD, FULL_HEAD)
    for name, channels in RESNET_CHANNELS.items():
        variants[name] = {**variants[name], **channels}
    return variants


SPEC = ModelSpec(
    name="cris",
    config=CRISConfig,
    variants=_variants(),
    build=CRIS,
    description="CRIS (Wang et al. 2022): sentence-gated FPN, word decoder, one sentence kernel; CRIS.pytorch layer for layer",
)
