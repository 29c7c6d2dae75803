"""open_clip image and text encoders exposing the features EAVL and CRIS need (EAVL paper 3.1).

Image (ResNet): the trunk's stage-2 and stage-3 maps x2, x3, and stage 4 through CLIP's
attention pool applied densely (eq 1: [z-bar, z] = MHSA([x-bar_4, x_4]) with every position a
query, not only the pooled token), its positional embedding resized bicubically to the input's
grid. Learnable projections then give F_v2 [B,C2,H/8,W/8], F_v3 [B,C3,H/16,W/16],
F_v4 [B,C4,H/32,W/32] and F_vg [B,C4]. At 480 px RN50's x2, x3, x4 are (512,60,60),
(1024,30,30), (2048,15,15).

Image (ViT): the class token's output is z-bar (-> F_vg); the patch tokens, as a map resized
to H/16 x W/16 (ViT-L/14 at 480 gives 34 x 34 patches), go through three convolutions giving
F_v2, F_v3, F_v4 with the ResNet path's shapes (paper, end of 3.1). The positional embedding is
resized bicubically to the patch grid.

Text: CLIP's transformer on the given length L (positional embedding [:L], causal mask
[:L,:L]): F_t [B,L,Ct] = every token's feature, F_tg [B,Cg] = the EOT token's feature (EOT =
argmax of the ids) through CLIP's text projection; padding mask = ids == 0.

Weights: `pretrained` None (random init), an open_clip tag ("openai", ...) or a local file.
A tag whose weights are not cached, while offline (HF_HUB_OFFLINE=1 or no network), fails at
once with one `ModelError` line; nothing waits on the network.

Backbone variants are data (`BACKBONES`): the tiny ones are small open_clip configs in
models/configs/*.json, registered with `open_clip.add_model_config`.
"""

from __future__ import annotations

import logging
from importlib import resources
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .api import ModelError

CONFIG_DIR = Path(str(resources.files(__package__) / "configs"))  # refbench-tiny-*.json open_clip model configs

# Backbone variants, as data: the open_clip architecture, the input size and the widths of
# the projected vision features F_v2, F_v3, F_v4 (= F_vg). Full sizes follow CRIS's fpn_in.
# `tiny` (the CPU quickstart's) runs its 128 px open_clip config (ResNet [1,1,1,1], width 16) at
# 96 px, the attention pool's positional embedding interpolated as for RN50 at 480, and takes
# its BCE at the input size. Measured on the quickstart's data (tiny EAVL, 600 steps, seeds 0/1,
# testB mIoU): 96 px 58.9 / 61.5%; 128 px learns more per step (67.1 / 64.5%) but a step costs
# about 1.5x (767 against 517 ms, one thread), and in the same time (340 steps) gave 60.5 / 56.0%;
# the BCE on the H/4 prediction grid instead of the input gave 50.7 / 53.8%.
BACKBONES: dict[str, dict] = {
    "tiny": dict(clip_arch="refbench-tiny-rn", image_size=96, dim_v2=64, dim_v3=128, dim_v4=128, loss_resolution="input"),
    "tiny-vit": dict(clip_arch="refbench-tiny-vit", image_size=128, dim_v2=64, dim_v3=128, dim_v4=128),
    "rn50": dict(clip_arch="RN50", image_size=480, dim_v2=512, dim_v3=1024, dim_v4=1024),
    "rn101": dict(clip_arch="RN101", image_size=480, dim_v2=512, dim_v3=1024, dim_v4=1024),
    "vitb16": dict(clip_arch="ViT-B-16", image_size=480, dim_v2=512, dim_v3=1024, dim_v4=1024),
    "vitl14": dict(clip_arch="ViT-L-14", image_size=480, dim_v2=512, dim_v3=1024, dim_v4=1024),
}
SMALL_BACKBONES = ("tiny", "tiny-vit")  # variants that take a model's small head sizes


def make_variants(small_head: dict, full_head: dict) -> dict[str, dict]:
    """A model's variants: every backbone with the model's small or full head fields."""
    return {
        name: {**backbone, **(small_head if name in SMALL_BACKBONES else full_head)}
        for name, backbone in BACKBONES.items()
    }


@dataclass
class BackboneConfig:
    """Fields every CLIP-based model config has (model configs extend this flat dataclass)."""

    clip_arch: str = "refbench-tiny-rn"  # open_clip model config name (RN50, ViT-B-16, refbench-tiny-rn, ...)
    pretrained: str | None = None  # None = random init; an open_clip tag ("openai") or a local weights file
    quick_gelu: bool | None = None  # QuickGELU activations; None = decide from the weights (an open_clip tag says; a local file of an OpenAI architecture: True; random init: False), recorded at build
    image_size: int = 128  # square network input, pixels
    dim_v2: int = 64  # channels of F_v2 (stride 8)
    dim_v3: int = 128  # channels of F_v3 (stride 16)
    dim_v4: int = 128  # channels of F_v4 (stride 32) and of the global vision feature F_vg
    loss_resolution: str = "prediction"  # BCE at the "prediction" resolution (GT resized, as CRIS) or at the "input" (logits upsampled)

    def __post_init__(self) -> None:
        if self.quick_gelu is None and self.pretrained is None:
            self.quick_gelu = False  # random init: decided now, so a config equals the one a build records


class ImageFeatures(NamedTuple):
    v2: torch.Tensor  # F_v2 [B,C2,H/8,W/8]
    v3: torch.Tensor  # F_v3 [B,C3,H/16,W/16]
    v4: torch.Tensor  # F_v4 [B,C4,H/32,W/32]
    vg: torch.Tensor | None  # F_vg [B,C4]; None when the model does not read it (no proj_vg built)


class TextFeatures(NamedTuple):
    words: torch.Tensor  # F_t [B,L,Ct], every token
    sentence: torch.Tensor  # F_tg [B,Cg], EOT token through the text projection
    pad: torch.Tensor  # bool [B,L], True where the id is 0 (padding)


# ------------------------------------------------------------------------------ weights


def register_tiny_configs() -> None:
    """Make the refbench-tiny-* JSON configs known to open_clip (idempotent)."""
    import open_clip

    if not all(p.stem in open_clip.list_models() for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname or url
    answers: list[bool] = []

    def probe() -> None:  # in a thread, so a slow DNS lookup cannot hold us past `timeout`
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answers.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answers)


def _cached_weights(cfg: dict) -> str | None:
    """The local file of an open_clip pretrained entry if it is already downloaded."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/repo/" (its default file names) or "org/repo/file.ext"
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


# The architectures OpenAI released CLIP weights for: all of them were trained with QuickGELU, so
# a local weights file for one of them (OpenAI's own archive, or open_clip's copy of it) runs
# QuickGELU unless the config says otherwise (`--set quick_gelu=False` for, e.g., LAION weights).
OPENAI_ARCHS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def resolve_pretrained(arch: str, pretrained: str | None) -> tuple[str | None, bool]:
    """(local weights file or None, whether the weights need QuickGELU).

    A local file of one of OPENAI_ARCHS needs QuickGELU (OpenAI trained them all with it);
    an open_clip tag says itself. Raises ModelError at once for an unknown tag, a missing file,
    or a tag whose weights are not cached while offline.
    """
    import open_clip

    if pretrained is None:
        return None, False
    if os.path.isfile(pretrained):
        return pretrained, arch in OPENAI_ARCHS
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelError(
            f"pretrained {pretrained!r} is neither a file nor an open_clip tag of {arch} (tags: {tags})"
        )
    quick_gelu = bool(cfg.get("quick_gelu", False))
    cached = _cached_weights(cfg)
    if cached:
        return cached, quick_gelu
    source = cfg.get("hf_hub") or cfg.get("url") or ""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else source
    if _offline() or not _reachable(endpoint):
        why = "HF_HUB_OFFLINE=1" if _offline() else "no network"
        raise ModelError(
            f"open_clip weights {arch}/{pretrained} are not in the local cache and we are offline ({why}); "
            f"download them where there is network and pass the file instead (--pretrained /path/to/{arch}.pt)"
        )
    try:
        return open_clip.download_pretrained(cfg), quick_gelu
    except Exception as e:  # network errors, hub errors: one line
        raise ModelError(f"could not download open_clip weights {arch}/{pretrained}: {str(e).splitlines()[0]}") from None


def _not_weights(path: str) -> str | None:
    """Why a local file cannot be a weights file, from its first bytes (None: it may be one).

    torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol byte 0x80);
    safetensors starts with an 8-byte header length and a JSON header.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "the file is empty, not a weights file"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[8:9] == b"{":
        return None
    return ("not a weights file (torch.save's zip or pickle, or safetensors): it starts with "
            f"{head[:12]!r}; pass an open_clip tag (e.g. openai) or a .pt/.bin/.safetensors file")


def create_clip(cfg: BackboneConfig):
    """The open_clip CLIP model for `cfg` (random init or loaded weights), on CPU, fp32."""
    import open_clip

    register_tiny_configs()
    if cfg.clip_arch not in open_clip.list_models():
        raise ModelError(f"unknown open_clip architecture {cfg.clip_arch!r}")
    path, weights_quick_gelu = resolve_pretrained(cfg.clip_arch, cfg.pretrained)
    if cfg.quick_gelu is None:  # recorded in the config, so a rebuild from a checkpoint (pretrained=None) matches
        cfg.quick_gelu = weights_quick_gelu
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns on every random init, which is our default
    try:
        if path is not None and is_torchscript(path):  # OpenAI's legacy archive (~/.cache/clip/RN50.pt)
            model = open_clip.create_model(cfg.clip_arch, pretrained=None, force_quick_gelu=cfg.quick_gelu)
            state = torchscript_state_dict(path)
            missing, _ = model.load_state_dict(state, strict=False)  # extra buffers (attn_mask) are not weights
            if missing:
                raise ValueError(f"the archive lacks {len(missing)} weights, e.g. {missing[0]}")
            return model
        return open_clip.create_model(cfg.clip_arch, pretrained=path, force_quick_gelu=cfg.quick_gelu)
    except Exception as e:  # a weights file that does not fit the architecture, a corrupt file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e):  # torch's advice to load unsafely is not ours to give
            reason = "the file does not load as plain tensors (torch.load weights_only=True refused it)"
        reason = (_not_weights(path) if path is not None else None) or reason
        raise ModelError(f"could not load weights {cfg.pretrained!r} into open_clip {cfg.clip_arch}: {reason}") from None
    finally:
        logging.disable(previous)


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's original CLIP files are), which a
    weights_only torch.load refuses: a zip with a code/ folder and constants.pkl."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The CLIP weights of an OpenAI TorchScript archive, as float32 (the archive holds fp16),
    without the archive's non-weight entries."""
    archive = torch.jit.load(path, map_location="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in archive.state_dict().items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


# ------------------------------------------------------------------------------ image


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1+S*S, C] (a leading global/class slot, then a square S x S grid) -> [1+h*w, C].

    The grid part is resized bicubically (as CRIS does for the attention pool); the leading
    slot is kept as it is.
    """
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if (side, side) == tuple(grid):
        return pos
    grid_pos = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1,C,S,S]
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid_pos.flatten(2).transpose(1, 2)[0]], dim=0)


def dense_attention_pool(pool: nn.Module, x4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 1 on CLIP's AttentionPool2d with every position as a query.

    x4 [B,C,H4,W4] -> (z-bar [B,D], z [B,D,H4,W4]); D = the pool's output dim. z-bar equals
    open_clip's own pooled output at the native grid.
    """
    b, c, h, w = x4.shape
    tokens = x4.flatten(2).transpose(1, 2)  # [B,HW,C]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [x-bar_4, x_4]: [B,1+HW,C]
    tokens = tokens + resize_pos_embed(pool.positional_embedding, (h, w)).to(tokens.dtype)
    heads = pool.num_heads

    def split(t):  # [B,N,C] -> [B,heads,N,C/heads]
        return t.reshape(b, -1, heads, c // heads).transpose(1, 2)

    q, k, v = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
    out = F.scaled_dot_product_attention(q, k, v)  # [B,heads,1+HW,C/heads]
    out = pool.c_proj(out.transpose(1, 2).reshape(b, -1, c))  # [B,1+HW,D]
    z_bar = out[:, 0]  # [B,D]
    z = out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)  # [B,D,H4,W4]
    return z_bar, z


def _drop_unbuilt_proj_vg(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: an encoder without proj_vg ignores a checkpoint's proj_vg
    weights (checkpoints written when every model built F_vg's projection, read or not)."""
    if getattr(module, "proj_vg", None) is None:
        for key in [k for k in state_dict if k.startswith(prefix + "proj_vg.")]:
            del state_dict[key]


class ResNetImageEncoder(nn.Module):
    """CLIP ModifiedResNet -> F_v2, F_v3, F_v4, F_vg (EAVL 3.1, eq 1).

    With global_vision=False there is no proj_vg and F_vg is None: a parameter no loss reaches
    would make DDP (without find_unused_parameters) fail on the second step.
    """

    def __init__(self, visual: nn.Module, cfg: BackboneConfig, global_vision: bool = True):
        super().__init__()
        self.visual = visual  # open_clip ModifiedResNet (its BatchNorm layers are CLIP's own)
        width = visual.layer1[0].conv1.in_channels  # the stem width
        out_dim = visual.attnpool.c_proj.out_features
        self.proj_v2 = nn.Conv2d(width * 8, cfg.dim_v2, 1)  # x2 -> F_v2 (learnable matrix)
        self.proj_v3 = nn.Conv2d(width * 16, cfg.dim_v3, 1)  # x3 -> F_v3
        self.proj_v4 = nn.Conv2d(out_dim, cfg.dim_v4, 1)  # z -> F_v4
        self.proj_vg = nn.Linear(out_dim, cfg.dim_v4) if global_vision else None  # z-bar -> F_vg
        self.register_load_state_dict_pre_hook(_drop_unbuilt_proj_vg)

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        v = self.visual
        x = v.layer1(v.stem(image))  # [B,4w,H/4,W/4]
        x2 = v.layer2(x)  # [B,8w,H/8,W/8]
        x3 = v.layer3(x2)  # [B,16w,H/16,W/16]
        x4 = v.layer4(x3)  # [B,32w,H/32,W/32]
        z_bar, z = dense_attention_pool(v.attnpool, x4)  # [B,D], [B,D,H/32,W/32]
        vg = self.proj_vg(z_bar) if self.proj_vg is not None else None
        return ImageFeatures(self.proj_v2(x2), self.proj_v3(x3), self.proj_v4(z), vg)


def vit_tokens(visual: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP VisionTransformer at any input size: (z-bar [B,D], z [B,D,gh,gw]).

    Class token and patch tokens both go through ln_post and the output projection, so
    z-bar equals open_clip's own image feature at the native size.
    """
    x = visual.conv1(image)  # [B,W,gh,gw]
    b, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B,gh*gw,W]
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, width)
    x = torch.cat([cls, x], dim=1) + resize_pos_embed(visual.positional_embedding, (gh, gw)).to(x.dtype)
    x = visual.transformer(visual.ln_pre(x))  # [B,1+gh*gw,W]
    x = visual.ln_post(x) @ visual.proj  # [B,1+gh*gw,D]
    return x[:, 0], x[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)


class ViTImageEncoder(nn.Module):
    """CLIP VisionTransformer -> F_v2, F_v3, F_v4 by three convolutions, F_vg from the class token
    (no proj_vg and F_vg None with global_vision=False, as for the ResNet encoder)."""

    def __init__(self, visual: nn.Module, cfg: BackboneConfig, global_vision: bool = True):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ModelError("only CLIP ViTs with class-token pooling are supported")
        self.visual = visual  # open_clip VisionTransformer
        out_dim = visual.proj.shape[1]
        self.up_v2 = nn.ConvTranspose2d(out_dim, cfg.dim_v2, 2, stride=2)  # H/16 -> H/8
        self.proj_v3 = nn.Conv2d(out_dim, cfg.dim_v3, 1)  # H/16
        self.down_v4 = nn.Conv2d(out_dim, cfg.dim_v4, 2, stride=2)  # H/16 -> H/32
        self.proj_vg = nn.Linear(out_dim, cfg.dim_v4) if global_vision else None  # class token -> F_vg
        self.register_load_state_dict_pre_hook(_drop_unbuilt_proj_vg)

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        z_bar, z = vit_tokens(self.visual, image)  # [B,D], [B,D,gh,gw]
        grid = (image.shape[-2] // 16, image.shape[-1] // 16)  # the ResNet path's H/16 grid
        if tuple(z.shape[-2:]) != grid:  # e.g. ViT-L/14 at 480: 34 x 34 -> 30 x 30
            z = F.interpolate(z, size=grid, mode="bilinear", align_corners=False)
        vg = self.proj_vg(z_bar) if self.proj_vg is not None else None
        return ImageFeatures(self.up_v2(z), self.proj_v3(z), self.down_v4(z), vg)


# ------------------------------------------------------------------------------ text


class TextEncoder(nn.Module):
    """CLIP's text transformer on any length L <= context length: F_t, F_tg, padding mask."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding  # [77,Ct]
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [Ct,Cg] parameter (or a Linear)
        self.width = self.positional_embedding.shape[1]  # Ct
        proj = self.text_projection
        self.out_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]  # Cg

    def forward(self, tokens: torch.Tensor) -> TextFeatures:
        b, length = tokens.shape
        if length > self.positional_embedding.shape[0]:
            raise ModelError(f"token length {length} exceeds the text encoder's context of {self.positional_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [B,L,Ct]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        words = self.ln_final(self.transformer(x, attn_mask=causal))  # F_t [B,L,Ct]
        eot = words[torch.arange(b, device=tokens.device), tokens.argmax(dim=-1)]  # [B,Ct]
        proj = self.text_projection
        sentence = proj(eot) if isinstance(proj, nn.Linear) else eot @ proj  # F_tg [B,Cg]
        return TextFeatures(words, sentence, tokens == 0)


# ------------------------------------------------------------------------------ both


class ClipBackbone(nn.Module):
    """open_clip encoders for one config: `image_encoder(image)` and `text_encoder(tokens)`.

    With text=False (the blind control) the text tower is not kept; with global_vision=False the
    image encoder builds no F_vg projection (a model that never reads F_vg must not own
    parameters without gradients). `resnet_encoder` replaces `ResNetImageEncoder` on ResNet
    trunks (CRIS's layout takes the trunk's maps unprojected).
    """

    def __init__(self, cfg: BackboneConfig, text: bool = True, global_vision: bool = True,
                 resnet_encoder: type | None = None):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        clip = create_clip(cfg)
        resnet_encoder = resnet_encoder or ResNetImageEncoder  # CRIS passes its own (models/cris.py)
        encoder = resnet_encoder if isinstance(clip.visual, ModifiedResNet) else ViTImageEncoder
        self.image_encoder = encoder(clip.visual, cfg, global_vision=global_vision)
        self.text_encoder = TextEncoder(clip) if text else None
        self.dim_words = self.text_encoder.width if text else 0  # Ct
        self.dim_sentence = self.text_encoder.out_dim if text else 0  # Cg

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None):
        text = self.text_encoder(tokens) if self.text_encoder is not None and tokens is not None else None
        return self.image_encoder(image), text
