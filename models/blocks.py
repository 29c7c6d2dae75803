"""Building blocks shared by EAVL, CRIS and the blind control.

Everything two models have in common lives here once: the conv block, coordinate features,
the Fusion Neck (EAVL eqs 2-5, also run without text for eq 6 and by the blind control),
sine position encodings, the vision-language transformer decoder (CRIS layout), the
upsampling pixel projector (CRIS's and EAVL eq 11), the batched dynamic convolution
(CRIS's sentence kernel, EAVL eq 12) and the mask loss.

Normalisation in the conv blocks is a choice (`NORMS`): "group" (GroupNorm: a sample's output
never depends on the other samples in its batch, and train and eval mode compute the same
function, dropout aside; EAVL and the blind control use it) or "batch" (BatchNorm, as CRIS's
code has it, so CRIS's weights load; `CRISConfig.norm`). The CLIP ResNet trunk keeps its own
BatchNorm layers either way.

Shapes: B batch, C channels, H x W a feature map, L words, K kernels (queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def norm_groups(channels: int) -> int:
    """GroupNorm group count: up to 32 groups that divide `channels`."""
    return math.gcd(32, channels)


NORMS = {  # normalisation of a conv block's C channels, by name
    "group": lambda c: nn.GroupNorm(norm_groups(c), c),
    "batch": nn.BatchNorm2d,
}


def norm_2d(norm: str, channels: int) -> nn.Module:
    """The `NORMS[norm]` layer for `channels` channels; ValueError naming the known ones otherwise."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    return NORMS[norm](channels)


def conv_block(c_in: int, c_out: int, kernel: int = 3, norm: str = "group") -> nn.Sequential:
    """Conv (no bias) -> norm -> ReLU; 'same' padding. The sigma(F W) of the papers (CRIS's conv_layer)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        norm_2d(norm, c_out),
        nn.ReLU(inplace=True),
    )


def coord_features(x: torch.Tensor) -> torch.Tensor:
    """F_coord: normalised (x, y) coordinates in [-1, 1], shape [B,2,H,W] like `x`."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H,W] each
    return torch.stack([grid_x, grid_y]).expand(b, 2, h, w)


def linear_block(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """A vector's projection sigma(F W): CRIS's linear_layer (Linear without bias, BatchNorm1d,
    ReLU) for norm "batch"; Linear + ReLU for "group" (one vector per sample has no groups to
    normalise)."""
    if norm == "batch":
        return nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Linear(c_in, c_out), nn.ReLU(inplace=True))


class CoordConv(nn.Module):
    """Conv([F, F_coord]): a 3x3 conv block over the features with coordinates appended."""

    def __init__(self, c_in: int, c_out: int, norm: str = "group"):
        super().__init__()
        self.conv = conv_block(c_in + 2, c_out, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C_in,H,W] -> [B,C_out,H,W]
        return self.conv(torch.cat([x, coord_features(x)], dim=1))


class FusionNeck(nn.Module):
    """EAVL's Fusion Neck, eqs 2-5; with `sentence=None` it is the dense-vision branch, eq 6.

    Inputs F_v2 [B,C2,H/8], F_v3 [B,C3,H/16], F_v4 [B,C4,H/32] and, optionally, the sentence
    feature F_tg [B,Ct]. Output F_inte [B,C,H/16,W/16] (eq 5, before the flatten). Every
    learnable matrix W of the equations is a 1x1 conv block (conv, GroupNorm, ReLU = sigma).
    Each half of the concatenations of eq 3 has C/2 channels, so F_m4, F_m3, F_m2 all have C.
    """

    def __init__(self, dim_v2: int, dim_v3: int, dim_v4: int, dim_text: int | None, dim: int, norm: str = "group"):
        super().__init__()
        half = dim // 2
        self.w_v4 = conv_block(dim_v4, dim, 1, norm)  # W_v4 (eq 2 / eq 6)
        self.w_tg = linear_block(dim_text, dim, norm) if dim_text else None  # W_tg (eq 2); absent in the text-free branch (eq 6)
        self.w_m4 = conv_block(dim, half, 1, norm)  # W_m4 (eq 3)
        self.w_v3 = conv_block(dim_v3, half, 1, norm)  # W_v3 (eq 3)
        self.w_m3 = conv_block(dim, half, 1, norm)  # W_m3 (eq 3)
        self.w_v2 = conv_block(dim_v2, half, 1, norm)  # W_v2 (eq 3)
        self.aggregate = conv_block(3 * dim, dim, 1, norm)  # eq 4: 1x1 conv over [F_m2, F_m3, F_m4]
        self.coord = CoordConv(dim, dim, norm)  # eq 5: Conv([F_m, F_coord])

    def forward(self, v2, v3, v4, sentence: torch.Tensor | None = None) -> torch.Tensor:
        # eq 2: F_m4 = Up(sigma(F_v4 W_v4) . sigma(F_tg W_tg))   -> [B,C,H3,W3]
        # eq 6: F'_m4 = Up(sigma(F_v4 W_v4))                      (text-free branch)
        m4 = self.w_v4(v4)  # [B,C,H4,W4]
        if sentence is not None:
            m4 = m4 * self.w_tg(sentence)[:, :, None, None]
        m4 = F.interpolate(m4, size=v3.shape[-2:], mode="bilinear", align_corners=False)  # Up: H4 -> H3 = 2 H4
        # eq 3: F_m3 = [sigma(F_m4 W_m4), sigma(F_v3 W_v3)]      -> [B,C,H3,W3]
        m3 = torch.cat([self.w_m4(m4), self.w_v3(v3)], dim=1)
        # eq 3: F'_v2 = Avg(F_v2) (2x2, stride 2); F_m2 = [sigma(F_m3 W_m3), sigma(F'_v2 W_v2)]
        m2 = torch.cat([self.w_m3(m3), self.w_v2(F.avg_pool2d(v2, 2, 2))], dim=1)
        # eq 4: F_m = Conv([F_m2, F_m3, F_m4])                   -> [B,C,H3,W3]
        fm = self.aggregate(torch.cat([m2, m3, m4], dim=1))
        # eq 5: F_inte = Conv([F_m, F_coord])                    -> [B,C,H3,W3]
        return self.coord(fm)


def sine_pos_1d(dim: int, length: int, device=None) -> torch.Tensor:
    """Transformer sine/cosine encoding of positions 0..length-1: [length, dim]."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sine_pos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """2-D sine encoding (half the channels for x, half for y), row-major: [h*w, dim]."""
    half = dim // 2
    pe_x = sine_pos_1d(half, w, device)  # [w, dim/2]
    pe_y = sine_pos_1d(half, h, device)  # [h, dim/2]
    return torch.cat([pe_x[None, :, :].expand(h, w, half), pe_y[:, None, :].expand(h, w, half)], dim=-1).reshape(h * w, dim)


class DecoderLayer(nn.Module):
    """One vision-language decoder layer, CRIS's `TransformerDecoderLayer` layer for layer.

    Queries are the vision tokens (self-attention among them, then cross-attention to the
    memory: words for CRIS, the generated queries F_q for EAVL), then a feed-forward block.
    Each sub-block is pre-normalised (norm1, norm2, norm3) and, as in CRIS's code, the two
    attention outputs get their own LayerNorm before the residual (self_attn_norm,
    cross_attn_norm) and the FFN has a LayerNorm on its hidden width:
        x = x + Drop(LN_sa(SelfAttn(q = k = LN1(x) + pos, v = LN1(x))))
        x = x + Drop(LN_ca(CrossAttn(q = LN2(x) + pos, k = mem + mem_pos, v = mem)))
        x = x + Drop(Linear(LN_ffn(Drop(ReLU(Linear(LN3(x)))))))
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.LayerNorm(ffn), nn.Linear(ffn, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pos, memory, memory_pos=None, memory_pad=None):
        """x [B,N,C] vision tokens, pos [N,C]; memory [B,M,C], memory_pos [M,C] | None,
        memory_pad bool [B,M] (True = padding, ignored) | None -> [B,N,C]."""
        h = self.norm1(x)
        q = h + pos
        x = x + self.drop(self.self_attn_norm(self.self_attn(q, q, h, need_weights=False)[0]))
        h = self.norm2(x)
        key = memory if memory_pos is None else memory + memory_pos
        attn = self.cross_attn(h + pos, key, memory, key_padding_mask=memory_pad, need_weights=False)[0]
        x = x + self.drop(self.cross_attn_norm(attn))
        return x + self.drop(self.ffn(self.norm3(x)))


class VisionLanguageDecoder(nn.Module):
    """A stack of `DecoderLayer`s over a feature map; 2-D sine positions on the vision side."""

    def __init__(self, layers: int, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, vis, memory, memory_pos=None, memory_pad=None) -> torch.Tensor:
        """vis [B,C,H,W] (queries), memory [B,M,C] (keys/values) -> [B,C,H,W]."""
        b, c, h, w = vis.shape
        pos = sine_pos_2d(c, h, w, vis.device).to(vis.dtype)  # [HW,C]
        x = vis.flatten(2).transpose(1, 2)  # [B,HW,C]
        for layer in self.layers:
            x = layer(x, pos, memory, memory_pos, memory_pad)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


def pixel_upsampler(c_in: int, c_out: int, pattern: str, norm: str = "group") -> nn.Sequential:
    """The os16 -> os4 pixel projector, described by a pattern of steps.

    U = 2x bilinear upsampling, C = 3x3 conv block, P = 1x1 conv. Convs keep c_in channels
    except the last C, which maps to c_out. EAVL eq 11 is "UCU" (F_p = Up(Conv(Up(F_s))));
    CRIS's projector is "UCUCP".
    """
    steps: list[nn.Module] = []
    n_conv = pattern.count("C")
    seen = 0
    c = c_in
    for step in pattern:
        if step == "U":
            steps.append(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False))
        elif step == "C":
            seen += 1
            c_next = c_out if seen == n_conv else c_in
            steps.append(conv_block(c, c_next, 3, norm))
            c = c_next
        elif step == "P":
            steps.append(nn.Conv2d(c, c, 1))
        else:
            raise ValueError(f"unknown pixel_upsampler step {step!r} in {pattern!r}")
    return nn.Sequential(*steps)


def dynamic_conv(features: torch.Tensor, params: torch.Tensor, kernel: int = 3, scale: float = 1.0) -> torch.Tensor:
    """Convolve each sample's map with its own K generated kernels, in one grouped conv.

    features [B,Cp,H,W]; params [B,K,k*k*Cp+1] (first k*k*Cp values: the kernel, laid out
    [Cp,k,k]; the last: the bias) -> [B,K,H,W]. The kernels (not the biases) are multiplied by
    `scale` (1 = CRIS). The batch is folded into channel groups: input [1, B*Cp, H, W], weight
    [B*K, Cp, k, k], groups=B, so no Python loop over samples.
    """
    b, cp, h, w = features.shape
    k = params.shape[1]
    weight = params[..., :-1].reshape(b * k, cp, kernel, kernel)  # [B*K,Cp,k,k]
    if scale != 1.0:
        weight = weight * scale
    bias = params[..., -1].reshape(b * k)  # [B*K]
    out = F.conv2d(features.reshape(1, b * cp, h, w), weight, bias, padding=kernel // 2, groups=b)
    return out.reshape(b, k, h, w)


LOSS_RESOLUTIONS = ("prediction", "input")  # where mask_bce_loss compares prediction and GT


def mask_bce_loss(logits: torch.Tensor, mask: torch.Tensor, resolution: str = "prediction") -> dict[str, torch.Tensor]:
    """Binary cross-entropy with logits, as {"loss": scalar, "bce": detached copy}.

    The mean over pixels: an empty mask (a gRefCOCO no-target sentence) is an all-background
    target, never a division by the target area (which is 0 there).

    logits [B,1,h,w] (h = H/4 for every model here); mask [B,1,H,W] in {0,1} at the input size.
    resolution "prediction" (CRIS): the GT is resized to h x w by nearest neighbour.
    resolution "input": the logits are upsampled bilinearly to H x W, the resolution evaluation
    maps predictions through, so mask edges are supervised below the logit grid (what the tiny
    128 px variants need: their logits are only 32 x 32).
    """
    if resolution not in LOSS_RESOLUTIONS:
        raise ValueError(f"loss resolution must be one of {LOSS_RESOLUTIONS}, not {resolution!r}")
    if mask.shape[-2:] != logits.shape[-2:]:
        if resolution == "input":
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        else:
            mask = F.interpolate(mask.float(), size=logits.shape[-2:], mode="nearest")
    bce = F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype))
    return {"loss": bce, "bce": bce.detach()}


class NoTargetHead(nn.Module):
    """A no-target head for generalized RIS (gRefCOCO), ReLA's in a simpler reading: the mean over
    positions of a multimodal map [B,C,h,w] -> MLP (C, C, 1) -> nt_logit [B] (positive = the
    sentence refers to nothing). ReLA has one MLP (256-256-2) per region query, its logits
    averaged, and a 2-class cross-entropy with class weights [0.9, 1.1]; here one pooled feature,
    one logit, plain BCE (`no_target_bce`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:  # [B,C,h,w] -> [B]
        return self.mlp(feature_map.float().mean(dim=(2, 3)).to(feature_map.dtype)).squeeze(-1)


def no_target_bce(terms: dict, out: dict, no_target: torch.Tensor | None, weight: float) -> dict:
    """`terms` (a mask loss's) plus `weight` x BCE(out["nt_logit"], no_target) as "no_target"; a
    batch without flags (None: RefCOCO) has a target in every sample."""
    logit = out["nt_logit"].float()
    target = torch.zeros_like(logit) if no_target is None else no_target.to(logit.device, torch.float32).reshape(logit.shape)
    bce = F.binary_cross_entropy_with_logits(logit, target)
    return {**terms, "loss": terms["loss"] + weight * bce, "no_target": bce.detach()}


def fixed_mask_head(dim: int, norm: str = "group") -> nn.Sequential:
    """A fixed-kernel mask head: F_p as EAVL eq 11 ("UCU", C -> C/2), then one learned 3x3
    conv to a single mask. EAVL's Table 3 "Fixed" aligner and the blind control use it.
    [B,C,H,W] -> [B,1,4H,4W]."""
    return nn.Sequential(pixel_upsampler(dim, dim // 2, "UCU", norm), nn.Conv2d(dim // 2, 1, 3, padding=1))


def head_kernel(conv: nn.Conv2d, batch: int) -> torch.Tensor:
    """A fixed head's learned kernel in `dynamic_conv`'s layout (weights [C,k,k] flattened, then
    the bias), the same for each of `batch` samples: [batch, k*k*C+1]. Models return it as
    their `kernel` (refbench.eval.sensitivity), so a fixed head reads as one kernel for every input."""
    flat = torch.cat([conv.weight.reshape(-1), conv.bias.reshape(-1)])
    return flat.expand(batch, -1)


def mask_correlation(masks: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Mean pairwise Pearson correlation, over pixels, of each sample's K masks: [B,K,H,W] -> [B].

    1.0 means K copies of one mask. `absolute` averages |corr| instead (a mask and its
    complement then count as alike, not as opposites). Differentiable (EAVL's decorrelation
    term uses it); refbench.eval.diversity reports it as query_mask_corr. Needs K >= 2; a constant
    mask counts as uncorrelated with every other.
    """
    b, k = masks.shape[:2]
    x = masks.flatten(2)
    x = x - x.mean(dim=-1, keepdim=True)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    corr = unit @ unit.transpose(1, 2)  # [B,K,K], ones on the diagonal (constant masks aside)
    if absolute:
        corr = corr.abs()
    off = corr.sum(dim=(1, 2)) - torch.diagonal(corr, dim1=1, dim2=2).sum(dim=1)
    return off / (k * (k - 1))
