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
- Each sigma(F W) of eqs 8-10 (W_t, W_vg, W_vd, W_a, W_tv) is Linear -> ReLU -> LayerNorm
  (`query_norm="after"`): where normalisation sits is the paper's open choice, and this is the
  one that keeps the queries apart (below). W_vd acts on a flattened H3*W3 map, so EAVL takes
  exactly `image_size` square inputs.
- Eq 9's softmax runs over every token but padding, CLIP's [SOS] included (`attend_sos`; the
  paper's words i = 1..L are F_t's, which it builds with [SOS] prepended), and its product is
  not scaled (`scaled_attention=False`, as written). [SOS] has one feature whatever the sentence
  (the text encoder is causal), so a query on it is language-free (refbench.eval.diversity's
  `sos_attention`). It is not so at initialisation (0.10-0.30 over seeds 0-7, the softmax
  already nearly one-hot: normalised entropy 0.13-0.23) but settles within the first 30 steps
  of the warm-up (seed 0: 0.34, 0.88, 0.99 at steps 10, 20, 30).
- Normalisation (`norm`): the paper names none. EAVL is built on CRIS's code, so its conv
  blocks (both necks, eq 7's convs, the pixel path) are CRIS's conv + BatchNorm + ReLU and eq
  2's sigma(F_tg W_tg) is CRIS's `txt_proj` (Linear without bias, BatchNorm1d, ReLU);
  `norm="group"` (GroupNorm, no norm on the sentence projection) was the default before.
- Which readings were measured, and why these (docs/eavl-readings.md has the whole seed table;
  `refbench bench seeds eavl --set FIELD=VALUE`; 600 steps on the quickstart's data, seeds 0-3,
  synthetic testB mIoU): the paper as written with GroupNorm 58.46 +- 2.69; eq 9 / sqrt(C)
  58.09 +- 2.99; [SOS] out of the softmax 55.54 +- 2.87, with the scale 53.58 +- 4.14, with the
  norm before the ReLU 53.42 +- 2.45, without the decorrelation term 53.80 +- 3.93 (the masks
  collapse); BatchNorm (`norm="batch"`) 60.32 +- 1.89, with [SOS] out 58.03 +- 2.75, with the
  scale 55.49 +- 2.55; CRIS 63.04 +- 0.19 (51.11 +- 2.49 with GroupNorm: CRIS's own
  normalisation is the largest effect measured). BatchNorm is the default: the best mean, the
  smallest spread, and the same seed within 1.0 point on AVX-512 and AVX2 kernels (0.22 and
  1.00 at seeds 0/1, where the GroupNorm head moved 6.53 and 3.38). No reading makes the queries
  read the sentence reliably: with [SOS] in the softmax 2-4 of 4 seeds put over 0.3 of the
  attention on it, under every reading; with it out the queries read the words and [EOS] but
  their kernels change less with the sentence than CRIS's (relative change 0.01-0.40 against
  0.45-0.55) and the runs score lower. The sentence reaches the mask through eq 2 and the
  decoder either way (mask sensitivity 0.83-0.90 for every reading), so a language-free kernel
  is a solution the loss does not penalise; nothing outside the paper is added to forbid it.
- Eq 13's MHSA is a transformer self-attention layer: attention, residual, LayerNorm.
- Eq 11 writes F_pn = sigma(W_p F_qn), but the text says "a linear layer", and with sigma a
  ReLU every kernel weight and bias would be >= 0 on a non-negative F_p: every logit >= 0,
  every pixel foreground. F_pn is linear here (as CRIS's text-to-pixel projector).
- Eq 12 writes the convolution over F_s, but the kernel has C_p = C/2 channels and the masks
  are 4H3 x 4W3: the dynamic kernel is applied to F_p, not F_s.
- Eq 12 gives the convolution no scale (figures of this item: the GroupNorm head). Each
  generated kernel is divided by sqrt(9 C_p) (`scaled_kernels`, the bias not), as attention
  divides q.k by sqrt(d): a generated kernel is a dot product with a 9 C_p patch. Unscaled
  (CRIS's choice, `scaled_kernels=False`), W_p sits behind two fan-ins: the initial logits have
  std ~5, and Adam, which moves each weight by about lr per step whatever its gradient, shifts
  whole masks at once. On the quickstart's data the loss then spikes (BCE 0.3 -> 1-5 in one
  step, gradient norms 40-160 against a clip of 1, the logits' mean swinging between -5 and +5)
  and runs fall into the language-blind basin: testB mIoU 11-28% in 6 of 7 runs at lr 1e-3 to
  3e-3 (500 steps, GPU sweep, fp32). Scaled, 8 runs of the same sweep give 12-51% and the probe
  shows no spike; at the tiny recipe's lr (6e-4, 500 steps) 53.5/55.0/57.6% over seeds 0-2
  against 54.0% unscaled (seed 0). It is also what lets the estimator choose (below).
- Loss: the paper says cross-entropy; for one foreground class that is binary cross-entropy
  on the final mask y. Where is a config field (`loss_resolution`): "prediction", against the
  ground truth resized (nearest) to y's resolution H/4 x W/4, as CRIS does (the paper variants);
  "input", y upsampled to the input size H x W (the tiny variant, whose H/4 grid is 24 px).
- Ablation switches (Tables 2-4): `num_queries`; `aligner="fixed"` replaces the whole aligner
  (Multi-Mask Generator and Estimator) by a fixed learned 3x3 kernel on F_p of the decoder
  output, the queries still feeding the decoder; `global_vision=False` drops F_vg from eq 8
  (F_tv = sigma(F_t W_t); the backbone then builds no F_vg projection); `estimator=False` sums the
  masks (query_weights are then all ones).

The N_q queries, and why they are kept apart (refbench.eval.diversity's figures on a quickstart
testB batch of 16, tiny variant, measured with the GroupNorm head, `norm="group"`, the default
then; mask correlation = mean pairwise Pearson correlation of the per-query mask logits):
- At initialisation, with plain Linear -> ReLU projections (`query_norm="none"`), eq 8's
  product of two ReLU outputs of default-initialised layers is ~0.006, so every later
  sigma(F W) outputs about its bias: all words give one value vector, eq 9's logits vary by
  ~0.01 across words and F_q is N_q copies of one vector (mask correlation 1.0000, S_q uniform
  to 5 digits, A's spread across queries 7e-5). With the norm before the ReLU ("before") the
  queries differ but stay alike (0.81-0.96 over seeds 0-4): eq 10's F_qn are convex
  combinations of non-negative vectors, so every kernel W_p F_qn shares one large component.
  The norm after the ReLU ("after") centres each value vector: 0.51-0.73 over seeds 0-4.
  Without the estimator's residual its self-attention averages the queries, so S_q is uniform.
- In training, the paper's loss alone cannot keep them apart. The loss reads the masks only
  through y = sum_n S_qn mask_n (eq 14), so each mask receives the same gradient S_qn dL/dy:
  gradient descent adds one common pattern to every mask while their differences keep their
  initial size, and BCE keeps growing that common part (the logits grow without bound). Distinct
  queries at init become one query within a few dozen steps (norm before the ReLU: 0.88 ->
  0.99 after 20 steps -> 0.9998 after 200 with BCE alone; tests/eval/test_diversity.py shows it on
  a short run).
- So the loss has one term the paper does not, the smallest we found that keeps them apart:
  `decorrelation` x mean over samples of max(0, mean_{i != j} |corr(sigmoid(mask_i),
  sigmoid(mask_j))| - `decorrelation_margin`) (weight 0.1, margin 0.8). It is zero while a
  sample's query masks are diverse enough and never touches y's supervision. Correlating the
  probabilities (not the logits) asks the masks to select different regions, not to differ in
  deep-background noise that the sum averages away; the absolute value stops the cheap answer
  an earlier version found, pairs of a mask and its complement (correlation -1; mean 0.06,
  testB mIoU 41.9%). Measured on the quickstart's data (synthetic testB mIoU): margins 0.5 and
  0.3 (weight 1, 1000 steps) gave 49.8% (mask correlation 0.55) and 48.0% (0.62), against 63.4%
  for the collapsed model. Margin 0.8 at weight 1 and 650 steps gave 55.4% (correlation 0.32)
  against 57.6% (0.96) with the paper's loss alone and 56.0% (1.0000) before the fix, but made
  short runs fragile: 300 steps on two threads ended at 13.1%, where weight 0.1 gives 41.0%
  (correlation 0.58). `decorrelation=0` is the paper's loss alone.
- The estimator's weights: with unscaled kernels they stayed close to uniform even with
  distinct masks (normalised entropy 0.95-1.0 after training), every mask's logits being large
  and alike in sign; with scaled kernels S_q is not uniform (entropy 0.68-0.87 over 18 runs of
  400-650 steps in the sweep above). Nothing here forces S_q apart.

Generalized RIS (gRefCOCO; not in the paper, which has one target per sentence): trained on
`grefcoco_unc`, a no-target sentence's mask is empty and the BCE above is a mean over pixels (no
division by the target area). `nt_head=True` adds a no-target head as ReLA has, in a simpler
reading (blocks.NoTargetHead): it reads the decoder output F_s (the last map where vision, the
sentence and the queries have met), mean-pooled over positions, through an MLP (C, C, 1) to one
`nt_logit` (> 0: no target), trained with BCE at weight `nt_weight` (1.0, our choice; ReLA's
2-class CE with class weights [0.9, 1.1] is not reproduced). Without the head, evaluation reads
"no target" from an empty binarised mask. Which rule is better on the synthetic gRefCOCO is
measured by `refbench bench seeds eavl --task gres` (README, gRefCOCO section).

forward returns logits [B,1,H/4,W/4], nt_logit [B] with `nt_head`, kernel [B,9C_p+1] (the kernel y is the convolution of F_p
with: sum_n S_qn W_qn, scale applied; refbench.eval.sensitivity compares it across sentences) and,
for visualisation, query_masks [B,Nq,H/4,W/4] (per-query logits), query_weights [B,Nq] (S_q)
and word_attention [B,Nq,L] (A of eq 9); the fixed aligner has no per-query masks, so it
returns logits, its fixed kernel and word_attention only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import ModelError, ModelSpec
from .blocks import (
    NORMS,
    FusionNeck,
    VisionLanguageDecoder,
    conv_block,
    dynamic_conv,
    fixed_mask_head,
    head_kernel,
    mask_bce_loss,
    NoTargetHead,
    mask_correlation,
    no_target_bce,
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
    norm: str = "batch"  # normalisation of the head's conv blocks and of eq 2's sentence projection: "batch" (BatchNorm, as CRIS's code EAVL is built on) or "group" (GroupNorm; the sentence projection then has none)
    num_queries: int = 24  # N_q, queries and masks (Table 2: 24 is best)
    aligner: str = "dynamic"  # "dynamic": the Vision-Language Aligner; "fixed": Table 3's fixed-kernel conv
    global_vision: bool = True  # use F_vg in eq 8 (Table 4); False: F_tv from F_t alone
    estimator: bool = True  # Multi-Query Estimator, eq 13 (Table 4); False: masks summed
    scaled_attention: bool = False  # eq 9's product divided by sqrt(C), as attention divides q.k by sqrt(d) (the paper gives no scale)
    attend_sos: bool = True  # CLIP's [SOS] is one of eq 9's words; False: it is left out of the softmax, as padding is
    query_norm: str = "after"  # where each sigma(F W) of eqs 8-10 is normalised: "after" (Linear, ReLU, LayerNorm), "before" (Linear, LayerNorm, ReLU), "none" (no norm: the queries are one query at init)
    scaled_kernels: bool = True  # eq 12: each generated kernel divided by sqrt(9 C_p), as attention divides q.k by sqrt(d) (the paper gives no scale); False = CRIS's unscaled kernels
    decorrelation: float = 0.1  # weight of the query-mask decorrelation term (0 = the paper's loss alone; see the module docstring)
    decorrelation_margin: float = 0.8  # the term penalises a sample's mean pairwise |correlation| of its query mask probabilities above this
    nt_head: bool = False  # gRefCOCO no-target head (blocks.NoTargetHead on the mean-pooled decoder output F_s): outputs nt_logit, BCE added to the loss
    nt_weight: float = 1.0  # weight of the no-target BCE in the loss (with nt_head)


SMALL_HEAD = dict(dim=128, heads=4, ffn=256, layers=3, dropout=0.0)  # tiny, tiny-vit
FULL_HEAD = dict(dim=512, heads=8, ffn=2048, layers=3, dropout=0.1)  # paper 4.1


QUERY_NORMS = {  # config `query_norm` -> the layers of one sigma(F W) of eqs 8-10, given (c_in, c_out)
    "after": lambda c_in, c_out: (nn.Linear(c_in, c_out), nn.ReLU(inplace=True), nn.LayerNorm(c_out)),
    "before": lambda c_in, c_out: (nn.Linear(c_in, c_out), nn.LayerNorm(c_out), nn.ReLU(inplace=True)),
    "none": lambda c_in, c_out: (nn.Linear(c_in, c_out), nn.ReLU(inplace=True)),
}


def relu_projection(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """sigma(F W) of eqs 8-10 with its normalisation (`QUERY_NORMS[norm]`), [..., c_in] -> [..., c_out]."""
    return nn.Sequential(*QUERY_NORMS[norm](c_in, c_out))


class MultiQueryGenerator(nn.Module):
    """Eqs 6-10: N_q queries, each a vision-guided attention over the (vision-fused) words."""

    def __init__(self, cfg: EAVLConfig, dim_words: int):
        super().__init__()
        c, nq = cfg.dim, cfg.num_queries
        grid = (cfg.image_size // 16) ** 2  # H3 * W3
        self.dense_neck = FusionNeck(cfg.dim_v2, cfg.dim_v3, cfg.dim_v4, None, c, cfg.norm)  # eq 6 + eqs 3-5
        self.to_maps = nn.Sequential(  # eq 7: three convs, C -> N_q maps
            conv_block(c, c // 2, 3, cfg.norm), conv_block(c // 2, c // 4, 3, cfg.norm), nn.Conv2d(c // 4, nq, 1)
        )
        norm = cfg.query_norm
        self.w_t = relu_projection(dim_words, c, norm)  # sigma(F_t W_t) (eq 8)
        self.w_vg = relu_projection(cfg.dim_v4, c, norm) if cfg.global_vision else None  # sigma(F_vg W_vg) (eq 8)
        self.w_vd = relu_projection(grid, c, norm)  # sigma(f_vdn W_vd) (eq 9), on a flattened H3*W3 map
        self.w_a = relu_projection(c, c, norm)  # sigma(f_tvi W_a) (eq 9)
        self.w_tv = relu_projection(c, c, norm)  # sigma(F_tv W_tv) (eq 10)
        self.attention_scale = c ** -0.5 if cfg.scaled_attention else 1.0  # eq 9's scale
        self.attend_sos = cfg.attend_sos

    def forward(self, vis: ImageFeatures, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        # eqs 6, 3-5: dense vision features without text -> F'_inte [B,C,H3,W3]
        dense = self.dense_neck(vis.v2, vis.v3, vis.v4)
        # eq 7: F_vd = Flatten(Conv(F'_inte))^T -> [B,Nq,H3*W3]
        f_vd = self.to_maps(dense).flatten(2)
        # eq 8: F_tv = sigma(F_t W_t) . sigma(F_vg W_vg) -> [B,L,C]
        f_tv = self.w_t(text.words)
        if self.w_vg is not None:
            f_tv = f_tv * self.w_vg(vis.vg)[:, None, :]
        # eq 9: a_ni = sigma(f_vdn W_vd) sigma(f_tvi W_a)^T, softmax over the words, padding excluded
        a = torch.einsum("bnc,blc->bnl", self.w_vd(f_vd), self.w_a(f_tv)) * self.attention_scale  # [B,Nq,L]
        ignored = text.pad if self.attend_sos else text.pad.index_fill(1, text.pad.new_zeros(1, dtype=torch.long), True)
        attention = a.masked_fill(ignored[:, None, :], float("-inf")).softmax(dim=-1)  # A [B,Nq,L]
        # eq 10: F_qn = A_n sigma(F_tv W_tv) -> F_q [B,Nq,C]
        f_q = attention @ self.w_tv(f_tv)
        return f_q, attention


class MultiQueryEstimator(nn.Module):
    """Eq 13: S_q = Softmax(W_s(MHSA(F_q))), one weight per query, summing to 1.

    MHSA is a transformer self-attention layer over the queries: attention, residual, LayerNorm
    (post-norm). Without the residual, near-uniform attention at the start averages the N_q
    queries into one vector, and W_s scores N_q copies of it: S_q stays uniform.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mhsa = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.w_s = nn.Linear(dim, 1)  # W_s

    def forward(self, f_q: torch.Tensor) -> torch.Tensor:  # [B,Nq,C] -> [B,Nq]
        h = self.norm(f_q + self.mhsa(f_q, f_q, f_q, need_weights=False)[0])  # [B,Nq,C]
        return self.w_s(h).squeeze(-1).softmax(dim=-1)


class VisionLanguageAligner(nn.Module):
    """Eqs 11-14: query-based dynamic kernels on F_p, then the estimator-weighted sum."""

    def __init__(self, cfg: EAVLConfig):
        super().__init__()
        c, cp = cfg.dim, cfg.dim // 2  # C_p = C/2
        self.pixel = pixel_upsampler(c, cp, "UCU", cfg.norm)  # eq 11: F_p = Up(Conv(Up(F_s)))
        self.w_p = nn.Linear(c, 9 * cp + 1)  # eq 11: F_pn = W_p F_qn (3x3 x C_p kernel + bias)
        self.kernel_scale = (9 * cp) ** -0.5 if cfg.scaled_kernels else 1.0  # eq 12's kernel scale
        layout = torch.full((9 * cp + 1,), self.kernel_scale)
        layout[-1] = 1.0  # the bias is not scaled
        self.register_buffer("kernel_layout", layout, persistent=False)  # F_pn -> the kernel dynamic_conv applies
        self.estimator = MultiQueryEstimator(c, cfg.heads) if cfg.estimator else None

    def forward(self, f_s: torch.Tensor, f_q: torch.Tensor) -> dict[str, torch.Tensor]:
        f_p = self.pixel(f_s)  # [B,Cp,4H3,4W3]
        # eq 12: mask_n = Psi_n(F_p, W_qn), all queries of all samples in one grouped conv
        params = self.w_p(f_q)  # [B,Nq,9Cp+1]
        masks = dynamic_conv(f_p, params, scale=self.kernel_scale)  # [B,Nq,4H3,4W3]
        # eq 13 (or, ablated, all ones = a plain sum)
        weights = self.estimator(f_q) if self.estimator is not None else masks.new_ones(masks.shape[:2])  # [B,Nq]
        # eq 14: y = sum_n S_qn mask_n
        y = torch.einsum("bn,bnhw->bhw", weights, masks)[:, None]  # [B,1,4H3,4W3]
        # eq 14 sums linear convolutions: y is one convolution of F_p with sum_n S_qn W_qn
        kernel = torch.einsum("bn,bnp->bp", weights, params) * self.kernel_layout  # [B,9Cp+1]
        return {"logits": y, "query_masks": masks, "query_weights": weights, "kernel": kernel}


class FixedAligner(nn.Module):
    """Table 3's baseline: a fixed learned 3x3 kernel on F_p of the decoder output; no queries."""

    def __init__(self, cfg: EAVLConfig):
        super().__init__()
        self.head = fixed_mask_head(cfg.dim, cfg.norm)

    def forward(self, f_s: torch.Tensor, f_q: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(f_s), "kernel": head_kernel(self.head[-1], f_s.shape[0])}  # [B,1,4H3,4W3]


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
        if cfg.norm not in NORMS:
            raise ModelError(f"EAVL norm must be one of {', '.join(NORMS)}, not {cfg.norm!r}")
        if cfg.query_norm not in QUERY_NORMS:
            raise ModelError(f"EAVL query_norm must be one of {', '.join(QUERY_NORMS)}, not {cfg.query_norm!r}")
        self.image_size = cfg.image_size
        self.decorrelation, self.decorrelation_margin = cfg.decorrelation, cfg.decorrelation_margin
        self.loss_resolution = cfg.loss_resolution
        self.backbone = ClipBackbone(cfg, global_vision=cfg.global_vision)  # F_vg only where eq 8 reads it
        self.fusion_neck = FusionNeck(cfg.dim_v2, cfg.dim_v3, cfg.dim_v4, self.backbone.dim_sentence, cfg.dim, cfg.norm)
        self.query_generator = MultiQueryGenerator(cfg, self.backbone.dim_words)
        self.decoder = VisionLanguageDecoder(cfg.layers, cfg.dim, cfg.heads, cfg.ffn, cfg.dropout)
        self.aligner = ALIGNERS[cfg.aligner](cfg)
        self.nt_weight = cfg.nt_weight
        self.nt_head = NoTargetHead(cfg.dim) if cfg.nt_head else None  # reads F_s, mean-pooled

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
        if self.nt_head is not None:
            out["nt_logit"] = self.nt_head(f_s)  # [B]: > 0 = no target
        return out

    def loss(self, out: dict, mask: torch.Tensor, no_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = mask_bce_loss(out["logits"], mask, self.loss_resolution)  # a mean over pixels: an empty mask is fine
        if self.nt_head is not None:
            terms = no_target_bce(terms, out, no_target, self.nt_weight)
        masks = out.get("query_masks")
        if self.decorrelation and masks is not None and masks.shape[1] >= 2:
            # mean over samples of max(0, mean_ij |corr(sigmoid(mask_i), sigmoid(mask_j))| - margin)
            corr = mask_correlation(masks.float().sigmoid(), absolute=True)  # [B]
            excess = (corr - self.decorrelation_margin).clamp_min(0).mean()
            terms = {**terms, "loss": terms["loss"] + self.decorrelation * excess, "decorrelation": excess.detach()}
        return terms


SPEC = ModelSpec(
    name="eavl",
    config=EAVLConfig,
    variants=make_variants(SMALL_HEAD, FULL_HEAD),
    build=EAVL,
    description="EAVL (Yan et al. 2023): Nq queries -> dynamic kernels -> weighted mask sum",
    absent_means={"scaled_kernels": False, "norm": "group"},  # what checkpoints written before these fields had
)
