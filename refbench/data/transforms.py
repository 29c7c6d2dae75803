"""Image and mask geometry between the original image and the square network input.

The network sees a `size x size` letterbox of the image, as CRIS builds it: the image is scaled
to fit inside the square keeping its aspect ratio, centred, and the border is padding that
reads 0 after CLIP normalisation (the mean colour). A frozen `Letterbox` records that geometry
so a prediction made over the square input can be mapped back to the original pixels:

    original H x W  --letterbox(scale, pad)-->  size x size input  --model-->  h x w logits
    h x w probabilities  --to_original(probs, boxes)-->  H x W   (the CRIS "original" protocol)
    H x W GT mask  --mask_to_input(mask, box)-->  size x size     (the "input" protocol)

Pixel convention everywhere: pixel i covers [i, i+1) and its centre is i + 0.5. The image
resize (bilinear with antialiasing), the mask resize (PIL nearest) and the inverse map of the
probabilities (`to_original`: separable bilinear weights, two matrix products) all use that
convention, so the three agree to the pixel.

Speed. `decode_image` decodes a JPEG with libjpeg-turbo (the `simplejpeg` wheel) straight at
M/8 of its size (M = 1..8, the smallest that still covers the letterbox), so a 640x480 COCO
image comes out of the IDCT at 480x360 for a 480 input with no full decode and no resize;
where M/8 does not land on the letterbox exactly, PIL's bilinear resizes the remainder (at
most a few pixels, its `box` keeping the exact geometry). Other images, and JPEGs libjpeg-turbo
cannot turn into RGB (CMYK), take the PIL path: full decode and torch's uint8 antialiased
bilinear resize (PIL's bilinear to +-1 grey level, faster). The two paths differ by the
resampling filter only, never by geometry (tests/data/test_transforms.py): the IDCT's downscaling
keeps more high frequencies than an antialiased bilinear. Measured on the COCO-like synthetic
set (640 x 427..480 JPEGs, strong pixel noise, so a worst case): mean |difference| 6.8 grey
levels (99th percentile 24) at 480 px, 0.9 (99th percentile 4) at 96 px. Training and
evaluation decode alike, so they stay consistent.

The loaders emit uint8 letterboxes (`letterbox_uint8`, padding 0) with the content box of
each, and the consumer normalises on its device (`normalize_batch`, as DALI and FFCV do): a
quarter of the bytes to collate, pin and copy, and no float work per sample on the CPU.
`normalize` (a numpy lookup table) stays for single images (`refbench predict`). No Python
loops over pixels. PIL and numpy are imported at module level, torch inside functions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB mean of CLIP's training images, in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # RGB std of CLIP's training images, in [0, 1]
DRAFT_GAP = 2.0  # decode a JPEG at 1/2, 1/4 or 1/8 scale when it stays >= DRAFT_GAP x the target


@dataclass(frozen=True)
class Letterbox:
    """Where an original `orig_w x orig_h` image sits inside the `size x size` network input."""

    size: int  # side of the square network input, pixels
    orig_w: int  # original image width, pixels
    orig_h: int  # original image height, pixels
    scale: float  # min(size / orig_w, size / orig_h): the aspect-preserving scale factor
    new_w: int  # width of the scaled image inside the input, round(orig_w * scale)
    new_h: int  # height of the scaled image inside the input, round(orig_h * scale)
    pad_x: int  # columns of padding left of the image; (size - new_w) // 2
    pad_y: int  # rows of padding above the image; (size - new_h) // 2

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> "Letterbox":
        """The letterbox of a `width x height` image in a `size x size` square."""
        if width < 1 or height < 1 or size < 1:
            raise ValueError(f"letterbox of a {width}x{height} image into {size}x{size}: sizes must be >= 1")
        scale = min(size / width, size / height)
        new_w = min(size, max(1, round(width * scale)))
        new_h = min(size, max(1, round(height * scale)))
        return cls(size, width, height, scale, new_w, new_h, (size - new_w) // 2, (size - new_h) // 2)


def decode_image(jpeg: bytes, size: int) -> tuple[np.ndarray, Letterbox]:
    """Decode image bytes straight to the scaled (unpadded) RGB image of its letterbox.

    Returns uint8 [new_h, new_w, 3] and the `Letterbox`; `letterbox_uint8` / `normalize` pad it.
    A JPEG larger than its letterbox decodes at M/8 scale (`scaled_decode`); anything else, or
    anything libjpeg-turbo refuses, goes through PIL, which raises on bad bytes (callers name
    the file).
    """
    scaled = scaled_decode(jpeg, size)
    if scaled is not None:
        return scaled
    image = Image.open(io.BytesIO(jpeg))
    return resize_image(image, size)


def scaled_decode(jpeg: bytes, size: int) -> tuple[np.ndarray, Letterbox] | None:
    """A JPEG decoded by libjpeg-turbo at the smallest M/8 scale covering its letterbox, or None.

    None when the bytes are not a JPEG simplejpeg reads as RGB (PNG, CMYK, damaged: the PIL
    path decides), when simplejpeg is not installed, or when the letterbox is not smaller than
    the image (an upscale: nothing to gain). The IDCT at M/8 of a W-pixel row gives
    ceil(W * M / 8) pixels covering W * M / 8 of the original extent; if that is not the
    letterbox size, PIL's bilinear resamples exactly that extent (`box=`) to it, so the
    geometry is the letterbox's to the sub-pixel.
    """
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - a dependency; the PIL path still works
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
    except (ValueError, TypeError):
        return None
    if colorspace not in ("RGB", "YCbCr", "Gray") or width < 1 or height < 1:
        return None
    box = Letterbox.fit(width, height, size)
    if box.new_w >= width or box.new_h >= height:
        return None
    try:
        rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_width=box.new_w, min_height=box.new_h)  # uint8 [h, w, 3]
    except ValueError:
        return None  # damaged or unusual: PIL decides (and names the problem)
    h, w = rgb.shape[:2]
    if (w, h) == (box.new_w, box.new_h):
        return rgb, box
    # the M/8 libjpeg-turbo used: its output is ceil(side * M / 8) on both axes
    m = next((k / 8 for k in range(1, 9) if -(-width * k // 8) == w and -(-height * k // 8) == h), w / width)
    extent = (0.0, 0.0, width * m, height * m)  # the original image's extent in decoded pixels
    small = Image.fromarray(rgb).resize((box.new_w, box.new_h), Image.Resampling.BILINEAR, box=extent)
    return np.asarray(small), box


def resize_image(image: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """Scale a PIL image (not yet loaded, for the JPEG draft to apply) to its letterbox size.

    Returns uint8 [new_h, new_w, 3] and the `Letterbox` of the image's original size. Bilinear
    with antialiasing, pixel-centre aligned. Two paths, one result: when the target is at least
    4x smaller than a JPEG, the decoder downscales by 1/2..1/8 in the DCT (`draft`) and PIL
    resizes the small remainder (its `box` keeps the exact geometry); otherwise torch's uint8
    antialiased bilinear kernel resizes: PIL's `resize(BILINEAR)` to +-1 grey level (its rounding
    differs on <1% of values), ~4x faster.
    """
    import torch
    import torch.nn.functional as F

    box = Letterbox.fit(image.width, image.height, size)
    if image.format == "JPEG" and min(image.width / box.new_w, image.height / box.new_h) >= 2 * DRAFT_GAP:
        drafted = image.draft("RGB", (max(1, int(box.new_w * DRAFT_GAP)), max(1, int(box.new_h * DRAFT_GAP))))
        crop = drafted[1] if drafted is not None else None  # the original's extent in drafted pixels
        image = image.resize((box.new_w, box.new_h), Image.Resampling.BILINEAR, box=crop)
        return np.array(image.convert("RGB") if image.mode != "RGB" else image), box
    if image.mode != "RGB":  # grayscale / CMYK JPEGs exist in COCO
        image = image.convert("RGB")
    rgb = np.array(image)  # uint8 [H, W, 3]
    if (box.new_w, box.new_h) == (image.width, image.height):
        return rgb, box
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # uint8 [1, 3, H, W] (channels-last strides)
    y = F.interpolate(x, size=(box.new_h, box.new_w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).numpy(), box  # uint8 [new_h, new_w, 3]


_LUT = (  # float32 [3, 256]: CLIP-normalised value of each uint8 level, per channel
    (np.arange(256)[None, :] / 255.0 - np.array(CLIP_MEAN)[:, None]) / np.array(CLIP_STD)[:, None]
).astype(np.float32)


def normalize(rgb: np.ndarray, box: Letterbox, out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Pad and CLIP-normalise a letterboxed image: uint8 [new_h, new_w, 3] -> float32 [3, S, S].

    The padding is exactly 0 (the mean colour after normalisation). Writes into `out` (a CPU
    float32 [3, S, S], e.g. one slot of a batch) when given. One numpy pass with a per-channel
    lookup table (about 1 ms at S = 480): single-threaded on purpose, since torch's intra-op
    threads contend with the model's in a loader running in the main process.
    """
    out = _square_input(rgb, box, out, "float32")
    o = out.numpy()  # [3, S, S] view of the same memory
    region = o[:, box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w]  # [3, new_h, new_w]
    for c in range(3):
        np.take(_LUT[c], rgb[:, :, c], out=region[c], mode="clip")
    return out


def letterbox_uint8(rgb: np.ndarray, box: Letterbox, out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Pad a letterboxed image into the square input, unnormalised: uint8 [new_h, new_w, 3] -> uint8 [3, S, S].

    The padding is 0; `normalize_batch` (on the consumer's device, with `content_box(box)`)
    turns it into exactly what `normalize` gives. Writes into `out` (a CPU uint8 [3, S, S],
    e.g. one slot of a batch) when given.
    """
    out = _square_input(rgb, box, out, "uint8")
    o = out.numpy()  # [3, S, S] view of the same memory
    o[:, box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w] = rgb.transpose(2, 0, 1)
    return out


def content_box(box: Letterbox) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside the square input: one row of a batch's "content"."""
    return (box.pad_y, box.pad_x, box.new_h, box.new_w)


def normalize_batch(images: "torch.Tensor", content: "torch.Tensor") -> "torch.Tensor":
    """CLIP-normalise a batch of uint8 letterboxes where it lies: uint8 [B,3,S,S] -> float32 [B,3,S,S].

    content: int [B, 4] (top, left, height, width) of each image inside the input; outside it
    the result is exactly 0 (the mean colour), as `normalize` pads. Inside it equals
    `normalize` to float32 rounding (the table is computed in float64, this in float32). Runs
    on `images`' device and keeps its memory format (channels_last stays channels_last).
    """
    import torch

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_batch wants uint8 [B,3,S,S], got {images.dtype} {tuple(images.shape)}")
    content = content.to(images.device)
    b, _, h, w = images.shape
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1) * 255)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    top, left, height, width = content.unbind(1)  # [B] each
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # [B, S]
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # [B, S]
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B, 1, S, S]
    return ((images.float() - mean) * inv_std) * inside


def image_to_tensor(image: Image.Image, size: int) -> tuple["torch.Tensor", Letterbox]:
    """A PIL image -> (float32 [3, S, S] normalised letterbox, its `Letterbox`)."""
    rgb, box = resize_image(image, size)
    return letterbox_tensor(rgb, box), box


def letterbox_tensor(rgb: np.ndarray, box: Letterbox) -> "torch.Tensor":
    """One letterboxed uint8 [new_h, new_w, 3] -> the float32 [3, S, S] network input, normalised
    as the loaders' batches are (`letterbox_uint8`, then `normalize_batch`): one image run alone
    (`refbench predict`, the pictures of `eval --vis`) gets bitwise the input it was scored with,
    not one within float32 rounding of it (a pixel at the threshold would flip)."""
    import torch

    content = torch.tensor([content_box(box)], dtype=torch.int64)
    return normalize_batch(letterbox_uint8(rgb, box)[None], content)[0]


def _square_input(rgb: np.ndarray, box: Letterbox, out: "torch.Tensor | None", dtype: str) -> "torch.Tensor":
    """The [3, S, S] tensor a letterboxed `rgb` goes into (`out`, or a new one of `dtype`), its
    padding zeroed; ValueError if `rgb` is not the uint8 [new_h, new_w, 3] that `box` describes."""
    import torch

    if rgb.shape != (box.new_h, box.new_w, 3) or rgb.dtype != np.uint8:
        raise ValueError(f"image of shape {rgb.shape} ({rgb.dtype}) does not match its letterbox {box.new_h}x{box.new_w}x3 uint8")
    if out is None:
        out = torch.empty(3, box.size, box.size, dtype=getattr(torch, dtype))
    _zero_border(out.numpy(), box)
    return out


def _zero_border(plane: np.ndarray, box: Letterbox) -> None:
    """Zero the padding of a [..., S, S] array around the letterboxed region, in place."""
    y0, y1, x0, x1 = box.pad_y, box.pad_y + box.new_h, box.pad_x, box.pad_x + box.new_w
    plane[..., :y0, :] = 0
    plane[..., y1:, :] = 0
    plane[..., y0:y1, :x0] = 0
    plane[..., y0:y1, x1:] = 0


def mask_to_input(mask: np.ndarray, box: Letterbox, out: np.ndarray | None = None) -> np.ndarray:
    """Move an original-size mask into the input frame (nearest): uint8 [H, W] -> [S, S].

    The padding is 0. This is the GT of the "input" protocol and the training target. Returns
    uint8 [S, S], or writes into `out` (any numeric [S, S] array, e.g. a float batch slot).
    Nearest is PIL's: output pixel j takes source pixel floor((j + 0.5) * H / new_h).
    """
    if mask.shape != (box.orig_h, box.orig_w):
        raise ValueError(f"mask of shape {mask.shape} does not match its image {box.orig_h}x{box.orig_w}")
    if out is None:
        out = np.empty((box.size, box.size), dtype=np.uint8)
    _zero_border(out, box)
    mask = mask.astype(np.uint8, copy=False)
    if not mask.flags.c_contiguous and mask.T.flags.c_contiguous:  # pycocotools decodes in Fortran order:
        small = Image.fromarray(mask.T).resize((box.new_h, box.new_w), Image.Resampling.NEAREST)  # resize the transpose
        small = np.asarray(small).T  # [new_h, new_w]
    else:
        small = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((box.new_w, box.new_h), Image.Resampling.NEAREST))
    out[box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w] = small
    return out


def mask_to_tensor(mask: np.ndarray, box: Letterbox) -> "torch.Tensor":
    """The training target: uint8 [H, W] original mask of 0/1 -> float32 [1, S, S] (nearest)."""
    import torch

    out = torch.empty(1, box.size, box.size, dtype=torch.float32)
    plane = mask_to_input(mask, box, out=out.numpy()[0])
    np.minimum(plane, 1, out=plane)  # any nonzero value is foreground
    return out


def to_original(probs: "torch.Tensor", boxes: Sequence[Letterbox]) -> list["torch.Tensor"]:
    """Map per-sample maps over the square input back to each original image (bilinear).

    probs: float [B, 1, h, w] over the S x S input (any h, w: logits or probabilities; h = w = S/4
    or S). Returns B tensors float [H_b, W_b], on probs' device. Each original pixel centre is
    sampled at its exact position in the input frame, as CRIS's `cv2.warpAffine` with the
    inverse letterbox matrix does: bilinear, align_corners=False, edges clamped (what
    `grid_sample(..., padding_mode="border")` computes). The map is separable, so it runs as a
    column pass and a row pass over the whole batch (`to_original_batch`), with interpolation
    weights built in float64: far cheaper than a grid_sample over every output pixel.
    """
    if not boxes and probs.dim() == 4 and probs.shape[:2] == (0, 1):
        return []
    warped = to_original_batch(probs, boxes)  # [B, max_h, max_w]
    return [warped[i, : b.orig_h, : b.orig_w] for i, b in enumerate(boxes)]  # B x [H_b, W_b]


def to_original_batch(probs: "torch.Tensor", boxes: Sequence[Letterbox]) -> "torch.Tensor":
    """`to_original` as one padded stack: float [B,1,h,w] -> [B, max H_b, max W_b] on probs' device.

    Sample b's map is `[b, :H_b, :W_b]`; beyond it the stack reads exactly 0. Separable
    bilinear in two passes: the columns as one batched matrix product (w -> max W_b, weights
    built in float64), then the rows as two row gathers and a lerp (each original row mixes
    two map rows), so the cost is a few passes over the output whatever h is, not h per pixel.
    """
    import torch

    if probs.dim() != 4 or probs.shape[1] != 1 or probs.shape[0] != len(boxes) or not boxes:
        raise ValueError(f"to_original wants probs [B,1,h,w] with B = {len(boxes)} >= 1 boxes, got {tuple(probs.shape)}")
    if len({b.size for b in boxes}) != 1:
        raise ValueError(f"to_original wants boxes of one input size, got {sorted({b.size for b in boxes})}")
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    device = probs.device
    n, _, h, w = probs.shape
    size = boxes[0].size
    max_h = max(b.orig_h for b in boxes)
    max_w = max(b.orig_w for b in boxes)
    c0, c1, cw0, cw1 = _resample_taps(max_w, w, [(b.orig_w, b.new_w / b.orig_w, b.pad_x) for b in boxes], size)  # [B, max_w]
    cols = torch.zeros(n, max_w, w, dtype=torch.float64)
    cols.scatter_add_(2, c0[:, :, None], cw0[:, :, None])
    cols.scatter_add_(2, c1[:, :, None], cw1[:, :, None])
    with torch.autocast(device.type, enabled=False):  # a caller's autocast (a bf16 run's validation) must not round the map
        wide = probs[:, 0].to(dtype) @ cols.to(device, dtype).transpose(1, 2)  # [B, h, max_w]
    r0, r1, rw0, rw1 = _resample_taps(max_h, h, [(b.orig_h, b.new_h / b.orig_h, b.pad_y) for b in boxes], size)  # [B, max_h]
    base = (torch.arange(n) * h)[:, None]  # row offset of each sample in the flattened [B*h, max_w]
    flat = wide.reshape(n * h, max_w)
    top = flat.index_select(0, (r0 + base).flatten().to(device)).view(n, max_h, max_w)
    bottom = flat.index_select(0, (r1 + base).flatten().to(device)).view(n, max_h, max_w)
    rw0, rw1 = rw0.to(device, dtype)[:, :, None], rw1.to(device, dtype)[:, :, None]
    return top.mul_(rw0).add_(bottom.mul_(rw1))  # [B, max_h, max_w]


def original_extent(boxes: Sequence[Letterbox], height: int, width: int, device: Any = None) -> "torch.Tensor":
    """bool [B, height, width]: True on sample b's original image, [:H_b, :W_b], False beyond."""
    import torch

    sizes = torch.tensor([(b.orig_h, b.orig_w) for b in boxes], dtype=torch.int64, device=device)  # [B, 2]
    rows = torch.arange(height, device=device)[None, :] < sizes[:, :1]  # [B, height]
    cols = torch.arange(width, device=device)[None, :] < sizes[:, 1:]  # [B, width]
    return rows[:, :, None] & cols[:, None, :]


def _resample_taps(n_out: int, n_in: int, axes: Sequence[tuple[int, float, int]], size: int):
    """Two-tap bilinear resampling of an input-frame axis of n_in cells to original pixels, per sample.

    axes: per sample (n_valid, scale, pad): original pixel centre i < n_valid sits at input
    coordinate (i + 0.5) * scale + pad (of `size`), i.e. at cell (that * n_in / size - 0.5) of
    the n_in-cell map, clamped to the edge cells. Returns (i0, i1, w0, w1), each [B, n_out]:
    output i = w0 * cell i0 + w1 * cell i1 (int64 indices, float64 weights, 0 for i >= n_valid).
    """
    import torch

    valid = torch.tensor([a[0] for a in axes], dtype=torch.int64)[:, None]  # [B, 1]
    scale = torch.tensor([a[1] for a in axes], dtype=torch.float64)[:, None]  # [B, 1]
    pad = torch.tensor([a[2] for a in axes], dtype=torch.float64)[:, None]  # [B, 1]
    i = torch.arange(n_out)[None, :]  # [1, n_out]
    centre = (i.double() + 0.5) * scale + pad  # [B, n_out] input pixels
    x = ((2 * centre / size) * n_in - 1) / 2  # = ((g + 1) * n_in - 1) / 2 with g = 2 * centre / size - 1
    x = x.clamp(0, n_in - 1)
    x0 = x.floor()
    frac = x - x0
    x0 = x0.long()
    x1 = (x0 + 1).clamp(max=n_in - 1)
    inside = (i < valid).double()  # [B, n_out]
    return x0, x1, (1 - frac) * inside, frac * inside
