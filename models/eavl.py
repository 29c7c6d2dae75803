"""EAVL (Yan et al. 2023, "Explicitly Align Vision and Language for Referring Image Segmentation").

The forward pass follows section 3 of the paper (Yan et al. 2023, arXiv:2308.09779), one named
step per equation:

  CLIP encoders (3.1, eq 1)     F_v2, F_v3, F_v4, F_vg; F_t, F_tg          models/clip_backbone.py
  Fusion Neck (eqs 2-5)         F_vt [B, H3*W3, C]                          blocks.FusionNeck
  Multi-Query Generator (6-10)  F_q [B, Nq, C], word attention A [B, Nq, L] MultiQueryGenerator
  Transformer decoder           F_s [B, C, H3, W3]; Q from F_vt, K and V from F_q
  Multi-Mask Generator (11-12)  mask_n [B, Nq, 4H3, 4W3]                    VisionLanguageAligner
  Multi-Query Estimator (13)    S_q [B, Nq]                                 MultiQueryEstimator
  weighted sum (14)             y [B, 1, 4H3, 4W3] = [B, 1, H/4, W/4]

Choices the paper leaves open, and where we read it, documented once here:
- Decoder: 8 heads, width 512, FFN 2048 (4.1); 3 layers as CRIS (the paper gives no count).
- Eq 9's product is divided by sqrt(C). ReLU is positively homogeneous, so this is the same
  model as the paper's with W_a scaled by 1/sqrt(C): an initialisation, not a new function.
  W_vd acts on a flattened H3*W3 map, so EAVL takes exactly `image_size` square inputs.
- Eq 11 writes F_pn = sigma(W_p F_qn), but the text says "a linear layer", and with sigma a
  ReLU every kernel weight and bias would be >= 0 on a non-negative F_p: every logit >= 0,
  every pixel foreground. F_pn is linear here (as CRIS's text-to-pixel projector).
- Eq 12 writes the convolution over F_s, but the kernel has C_p = C/2 channels and the masks
  are 4H3 x 4W3: the dynamic kernel is applied to F_p, not F_s.
- Loss: the paper says cross-entropy; for one foreground class that is binary cross-entropy
  on the final mask y. Where is a config field (`loss_resolution`): "prediction", against the
  ground truth resized (nearest) to y's resolution H/4 x W/4, as CRIS does (the paper variants);
  "input", y upsampled to the input size H x W (the tiny variant, whose H/4 grid is 24 px).
- Ablation switches (Tables 2-4): `num_queries`; `aligner="fixed"` replaces the whole aligner
  (Multi-Mask Generator and Estimator) by a fixed learned 3x3 kernel on F_p of the decoder
  output, the queries still feeding the decoder; `global_vision=False` drops F_vg from eq 8
  (F_tv = sigma(F_t W_t); the backbone then builds no F_vg projection); `estimator=False` sums the
  masks (query_weights are then all ones).

Known defect, measured (refbench.diversity) and not yet fixed here: the N_q queries collapse
into one. Eq 8's product of two ReLU outputs of default-initialised Linear layers is ~0.006,
so every later sigma(F W) outputs about its bias: all words give one value vector, eq 9's
logits vary by ~0.01 across words (a uniform softmax, more so after the 1/sqrt(C) scale) and
F_q is N_q copies of one vector (at init: mask correlation 1.0000, S_q uniform to 5 digits,
A's spread across queries 7e-5). The estimator's MHSA without a residual averages the queries
again, so S_q cannot differ. LayerNorms inside eqs 8-10, eq 9 unscaled and a residual in the
estimator give distinct queries at init (mask correlation 0.88), but training with the
paper's loss alone pulls them together again within ~50 steps (0.99 at step 20, 0.9997 at 50):
eq 14 hands every mask the same gradient S_qn dL/dy, and the kernels come from non-negative
queries through one W_p, so every kernel moves along one direction.

forward returns logits [B,1,H/4,W/4] and, for visualisation, query_masks [B,Nq,H/4,W/4]
(per-query logits), query_weights [B,Nq] (S_q) and word_attention [B,Nq,L] (A of eq 9);
the fixed aligner has no per-query masks, so it returns logits and word_attention only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import ModelError, ModelSpec
from .blocks import (
    FusionNeck,
    VisionLanguageDecoder,
    conv_block,
    dynamic_conv,
    fixed_mask_head,
    mask_bce_loss,
    pixel_upsampler,
)
from .clip_backbone import BackboneConfig, ClipBackbone, ImageFeatures, TextFeatures, make_variants


@dataclass
class EAVLConfig(BackboneConfig):
    dim: int = 128  # C: width of the neck, queries and decoder (paper and full variants: 512)
    heads: int = 4  # attention heads of the decoder and the estimator (paper: 8)
    ffn: int = 256  # decoder feed-forward width (paper: 2048)
    layers: int = 3  # decoder layers (CRIS's 3; the paper gives no number)
    dropout: float = 0.0  # decoder dropout (full variants: CRIS's 0.1)
    num_queries: int = 24  # N_q, queries and masks (Table 2: 24 is best)
    aligner: str = "dynamic"  # "dynamic": the Vision-Language Aligner; "fixed": Table 3's fixed-kernel conv
    global_vision: bool = True  # use F_vg in eq 8 (Table 4); False: F_tv from F_t alone
    estimator: bool = True  # Multi-Query Estimator, eq 13 (Table 4); False: masks summed


SMALL_HEAD = dict(dim=128, heads=4, ffn=256, layers=3, dropout=0.0)  # tiny, tiny-vit
FULL_HEAD = dict(dim=512, heads=8, ffn=2048, layers=3, dropout=0.1)  # paper 4.1


class MultiQueryGenerator(nn.Module):
    """Eqs 6-10: N_q queries, each a vision-guided attention over the (vision-fused) words."""

    def __init__(self, cfg: EAVLConfig, dim_words: int):
        super().__init__()
        c, nq = cfg.dim, cfg.num_queries
        grid = (cfg.image_size // 16) ** 2  # H3 * W3
        self.dense_neck = FusionNeck(cfg.dim_v2, cfg.dim_v3, cfg.dim_v4, None, c)  # eq 6 + eqs 3-5
        self.to_maps = nn.Sequential(  # eq 7: three convs, C -> N_q maps
            conv_block(c, c // 2, 3), conv_block(c // 2, c // 4, 3), nn.Conv2d(c // 4, nq, 1)
        )
        self.w_t = nn.Linear(dim_words, c)  # W_t (eq 8)
        self.w_vg = nn.Linear(cfg.dim_v4, c) if cfg.global_vision else None  # W_vg (eq 8)
        self.w_vd = nn.Linear(grid, c)  # W_vd (eq 9), acts on a flattened H3*W3 map
        self.w_a = nn.Linear(c, c)  # W_a (eq 9)
        self.w_tv = nn.Linear(c, c)  # W_tv (eq 10)
        self.scale = 1.0 / math.sqrt(c)  # eq 9 temperature (see the module docstring)

    def forward(self, vis: ImageFeatures, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        # eqs 6, 3-5: dense vision features without text -> F'_inte [B,C,H3,W3]
        dense = self.dense_neck(vis.v2, vis.v3, vis.v4)
        # eq 7: F_vd = Flatten(Conv(F'_inte))^T -> [B,Nq,H3*W3]
        f_vd = self.to_maps(dense).flatten(2)
        # eq 8: F_tv = sigma(F_t W_t) . sigma(F_vg W_vg) -> [B,L,C]
        f_tv = F.relu(self.w_t(text.words))
        if self.w_vg is not None:
            f_tv = f_tv * F.relu(self.w_vg(vis.vg))[:, None, :]
        # eq 9: a_ni = sigma(f_vdn W_vd) sigma(f_tvi W_a)^T, softmax over the words, padding excluded
        a = torch.einsum("bnc,blc->bnl", F.relu(self.w_vd(f_vd)), F.relu(self.w_a(f_tv))) * self.scale  # [B,Nq,L]
        attention = a.masked_fill(text.pad[:, None, :], float("-inf")).softmax(dim=-1)  # A [B,Nq,L]
        # eq 10: F_qn = A_n sigma(F_tv W_tv) -> F_q [B,Nq,C]
        f_q = attention @ F.relu(self.w_tv(f_tv))
        return f_q, attention


class MultiQueryEstimator(nn.Module):
    """Eq 13: S_q = Softmax(W_s(MHSA(F_q))), one weight per query, summing to 1."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mhsa = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.w_s = nn.Linear(dim, 1)  # W_s

    def forward(self, f_q: torch.Tensor) -> torch.Tensor:  # [B,Nq,C] -> [B,Nq]
        return self.w_s(self.mhsa(f_q, f_q, f_q, need_weights=False)[0]).squeeze(-1).softmax(dim=-1)


class VisionLanguageAligner(nn.Module):
    """Eqs 11-14: query-based dynamic kernels on F_p, then the estimator-weighted sum."""

    def __init__(self, cfg: EAVLConfig):
        super().__init__()
        c, cp = cfg.dim, cfg.dim // 2  # C_p = C/2
        self.pixel = pixel_upsampler(c, cp, "UCU")  # eq 11: F_p = Up(Conv(Up(F_s)))
        self.w_p = nn.Linear(c, 9 * cp + 1)  # eq 11: F_pn = W_p F_qn (3x3 x C_p kernel + bias)
        self.estimator = MultiQueryEstimator(c, cfg.heads) if cfg.estimator else None

    def forward(self, f_s: torch.Tensor, f_q: torch.Tensor) -> dict[str, torch.Tensor]:
        f_p = self.pixel(f_s)  # [B,Cp,4H3,4W3]
        # eq 12: mask_n = Psi_n(F_p, W_qn), all queries of all samples in one grouped conv
        masks = dynamic_conv(f_p, self.w_p(f_q))  # [B,Nq,4H3,4W3]
        # eq 13 (or, ablated, all ones = a plain sum)
        weights = self.estimator(f_q) if self.estimator is not None else masks.new_ones(masks.shape[:2])  # [B,Nq]
        # eq 14: y = sum_n S_qn mask_n
        y = torch.einsum("bn,bnhw->bhw", weights, masks)[:, None]  # [B,1,4H3,4W3]
        return {"logits": y, "query_masks": masks, "query_weights": weights}


class FixedAligner(nn.Module):
    """Table 3's baseline: a fixed learned 3x3 kernel on F_p of the decoder output; no queries."""

    def __init__(self, cfg: EAVLConfig):
        super().__init__()
        self.head = fixed_mask_head(cfg.dim)

    def forward(self, f_s: torch.Tensor, f_q: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(f_s)}  # [B,1,4H3,4W3]


ALIGNERS = {"dynamic": VisionLanguageAligner, "fixed": FixedAligner}  # config `aligner` -> class


class EAVL(nn.Module):
    """EAVL on a CLIP backbone: forward(image [B,3,S,S], tokens [B,L]) -> dict (see module doc)."""

    threshold = 0.35  # on sigmoid(logits), as CRIS

    def __init__(self, cfg: EAVLConfig):
        super().__init__()
        if cfg.aligner not in ALIGNERS:
            raise ModelError(f"EAVL aligner must be one of {', '.join(ALIGNERS)}, not {cfg.aligner!r}")
        if cfg.image_size % 32:
            raise ModelError(f"EAVL image_size must be a multiple of 32, not {cfg.image_size}")
        self.image_size = cfg.image_size
        self.loss_resolution = cfg.loss_resolution
        self.backbone = ClipBackbone(cfg, global_vision=cfg.global_vision)  # F_vg only where eq 8 reads it
        self.fusion_neck = FusionNeck(cfg.dim_v2, cfg.dim_v3, cfg.dim_v4, self.backbone.dim_sentence, cfg.dim)
        self.query_generator = MultiQueryGenerator(cfg, self.backbone.dim_words)
        self.decoder = VisionLanguageDecoder(cfg.layers, cfg.dim, cfg.heads, cfg.ffn, cfg.dropout)
        self.aligner = ALIGNERS[cfg.aligner](cfg)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ModelError(f"EAVL takes {self.image_size}x{self.image_size} images, got {tuple(image.shape[-2:])}")
        vis, text = self.backbone(image, tokens)
        # Fusion Neck, eqs 2-5: F_inte [B,C,H3,W3] (F_vt is its flattened form, taken in the decoder)
        f_inte = self.fusion_neck(vis.v2, vis.v3, vis.v4, text.sentence)
        # Multi-Query Generator, eqs 6-10: F_q [B,Nq,C], A [B,Nq,L]
        f_q, attention = self.query_generator(vis, text)
        # Transformer decoder: Q from F_vt, K and V from F_q -> F_s [B,C,H3,W3]
        f_s = self.decoder(f_inte, f_q)
        # Vision-Language Aligner, eqs 11-14 (or Table 3's fixed kernel)
        out = self.aligner(f_s, f_q)
        out["word_attention"] = attention
        return out

    def loss(self, out: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return mask_bce_loss(out["logits"], mask, self.loss_resolution)


SPEC = ModelSpec(
    name="eavl",
    config=EAVLConfig,
    variants=make_variants(SMALL_HEAD, FULL_HEAD),
    build=EAVL,
    description="EAVL (Yan et al. 2023): Nq queries -> dynamic kernels -> weighted mask sum",
)
