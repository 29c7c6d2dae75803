"""CRIS's image chain with OpenCV: its letterbox in, its inverse warp out (the `cris` protocol).

CRIS (and EAVL, ETRIS, DETRIS, which reuse its data and evaluation code) prepare an image and
map a prediction back like this, and the `cris` protocol repeats it operation for operation
with the same library (opencv-python-headless), because exactness needs the same resampling
kernels:

    JPEG bytes --cv2.imdecode(IMREAD_COLOR), BGR -> RGB--> uint8 [H, W, 3]
      --cv2.warpAffine(M, (S, S), INTER_CUBIC, border = CLIP mean x 255)--> uint8 [S, S, 3]
      --float, / 255, - mean, / std--> float32 [3, S, S]                    (`cris_image`)
    logits [1, h, w] --sigmoid--> --bicubic, align_corners=True, to S x S--> float32 [S, S]
      --cv2.warpAffine(M^-1, (W, H), INTER_CUBIC, border 0)--> float32 [H, W]
      --> 0.35--> the predicted mask, compared with the GT at the original size (`cris_to_original`)

M is CRIS's `getTransformMat`: the aspect-preserving scale min(S/H, S/W) with FLOAT offsets
((S - new)/2, not rounded), from `cv2.getAffineTransform` on float32 corner points, and M^-1 the
same call with the points swapped (not a numerical inverse). The cubic warp downscales without
antialiasing, unlike refbench's own letterbox (refbench.data.transforms): the two give different
inputs, so a model should be scored with the preprocessing it was trained on (`--recipe cris`
trains on this chain; `cris_train_mask` is CRIS's training target: the 0/255 mask warped with
INTER_LINEAR and divided by 255, soft at the edges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from refbench.data.transforms import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:  # pragma: no cover
    import torch

BORDER_RGB = tuple(255.0 * m for m in CLIP_MEAN)  # warpAffine border of the image, as CRIS (saturated to uint8 by OpenCV)


@dataclass(frozen=True)
class CrisWarp:
    """CRIS's affine letterbox of an `orig_w x orig_h` image into `size x size`."""

    size: int  # side of the square network input, pixels
    orig_w: int  # original image width, pixels
    orig_h: int  # original image height, pixels
    mat: np.ndarray  # float64 [2, 3]: original -> input (cv2.getAffineTransform)
    mat_inv: np.ndarray  # float64 [2, 3]: input -> original (getAffineTransform of the swapped points)

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> "CrisWarp":
        """CRIS's `getTransformMat((height, width), inverse=True)` for a `size x size` input."""
        import cv2

        if width < 1 or height < 1 or size < 1:
            raise ValueError(f"letterbox of a {width}x{height} image into {size}x{size}: sizes must be >= 1")
        scale = min(size / height, size / width)
        new_h, new_w = height * scale, width * scale
        bias_x, bias_y = (size - new_w) / 2.0, (size - new_h) / 2.0
        src = np.array([[0, 0], [width, 0], [0, height]], np.float32)
        dst = np.array([[bias_x, bias_y], [new_w + bias_x, bias_y], [bias_x, new_h + bias_y]], np.float32)
        return cls(size, width, height, cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src))


def decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 RGB [H, W, 3] as CRIS reads them (cv2.imdecode IMREAD_COLOR, BGR -> RGB).

    Raises ValueError when OpenCV cannot decode the bytes (callers name the file).
    """
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("OpenCV cannot decode the image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def warp_image(rgb: np.ndarray, size: int) -> tuple[np.ndarray, CrisWarp]:
    """uint8 RGB [H, W, 3] -> (uint8 [S, S, 3] letterbox, its `CrisWarp`): cubic warp, mean border."""
    import cv2

    warp = CrisWarp.fit(rgb.shape[1], rgb.shape[0], size)
    out = cv2.warpAffine(rgb, warp.mat, (size, size), flags=cv2.INTER_CUBIC, borderValue=BORDER_RGB)
    return out, warp


def normalize(warped: np.ndarray) -> "torch.Tensor":
    """uint8 [S, S, 3] -> float32 [3, S, S]: CRIS's torch ops, in its order (div_ 255, sub_ mean, div_ std)."""
    import torch

    img = torch.from_numpy(np.ascontiguousarray(warped.transpose(2, 0, 1))).float()  # [3, S, S]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).reshape(3, 1, 1)
    return img.div_(255.0).sub_(mean).div_(std)


def cris_image(data: bytes, size: int) -> tuple["torch.Tensor", CrisWarp]:
    """Image bytes -> (float32 [3, S, S] network input, its `CrisWarp`), CRIS's preprocessing."""
    warped, warp = warp_image(decode_rgb(data), size)
    return normalize(warped), warp


def cris_train_mask(mask: np.ndarray, warp: CrisWarp, out: np.ndarray | None = None) -> np.ndarray:
    """CRIS's training target: 0/1 mask [H, W] -> float32 [S, S] in [0, 1].

    The mask as CRIS stores it (0/255 uint8) warped with INTER_LINEAR (border 0) and divided by 255.
    """
    import cv2

    if mask.shape != (warp.orig_h, warp.orig_w):
        raise ValueError(f"mask of shape {mask.shape} does not match its image {warp.orig_h}x{warp.orig_w}")
    m255 = np.where(np.asarray(mask) != 0, np.uint8(255), np.uint8(0))
    warped = cv2.warpAffine(m255, warp.mat, (warp.size, warp.size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    target = warped.astype(np.float32) / np.float32(255.0)
    if out is None:
        return target
    out[...] = target
    return out


def input_square(probs: "torch.Tensor", size: int) -> np.ndarray:
    """CRIS's first step back: probabilities [B, 1, h, w] upsampled to S x S (bicubic,
    align_corners=True, on probs' device; skipped when already S x S, as CRIS skips it) ->
    float32 [B, S, S] on the CPU."""
    import torch.nn.functional as F

    probs = probs.float()
    if tuple(probs.shape[-2:]) != (size, size):
        probs = F.interpolate(probs, size=(size, size), mode="bicubic", align_corners=True)  # [B,1,S,S]
    return probs[:, 0].cpu().numpy()


def cris_to_original(probs: "torch.Tensor", warps: Sequence[CrisWarp]) -> list[np.ndarray]:
    """CRIS's way back: probabilities [B, 1, h, w] over the input -> B float32 [H_b, W_b] maps.

    Each map is upsampled to S x S (bicubic, align_corners=True; skipped when already S x S, as
    CRIS skips it) on probs' device, then warped to the original size on the CPU with
    cv2.warpAffine(M^-1, INTER_CUBIC, border 0). Binarise with `> threshold` (0.35).
    """
    import cv2

    if probs.dim() != 4 or probs.shape[1] != 1 or probs.shape[0] != len(warps):
        raise ValueError(f"cris_to_original wants probs [B,1,h,w] with B = {len(warps)} warps, got {tuple(probs.shape)}")
    if not warps:
        return []
    maps = input_square(probs, warps[0].size)  # float32 [B, S, S]
    return [
        cv2.warpAffine(m, w.mat_inv, (w.orig_w, w.orig_h), flags=cv2.INTER_CUBIC, borderValue=0.0)
        for m, w in zip(maps, warps)
    ]
