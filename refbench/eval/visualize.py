"""Pictures of predictions: overlays, EAVL's per-query masks, and which sentences to draw.

- `overlay(image, gt_mask, pred_mask, sentence, iou)`: the image with the prediction filled
  (semi-transparent), the GT outlined, and a caption band below it with the IoU and the
  sentence. Output size: (W, H + caption_height(W)).
- `query_grid(image, query_masks, weights)`: one tile per EAVL query mask (the Multi-Mask
  Generator's outputs) with its Multi-Query Estimator weight, sorted by weight, largest first.
- `pick_examples(ious, n, seed)`: which sentences `refbench eval --vis N` draws: the best,
  the worst and a seeded random few.
- `save_png(image, path)`: atomic PNG write (refbench.fsutil).

- `render_examples(...)`: `refbench eval --vis N`, the chosen sentences re-run and drawn.
- `main_predict(...)`: `refbench predict`, one image and one sentence -> mask PNG + overlay.

Drawing is PIL and numpy only; the last two run a model (torch imported inside them), with the
input preprocessing of the checkpoint's protocol (`preprocess`: refbench's letterbox, or CRIS's
OpenCV warp for checkpoints trained or converted for the `cris` protocol) and its way back to
the image, so a picture shows the mask that was scored.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from refbench import fsutil
from refbench.errors import RefbenchError


@dataclass(frozen=True)
class Style:
    pred_color: tuple[int, int, int] = (255, 64, 32)  # fill of the predicted mask (RGB)
    pred_alpha: float = 0.45  # opacity of that fill, 0..1
    gt_color: tuple[int, int, int] = (0, 255, 0)  # outline of the GT mask (RGB)
    gt_width_frac: float = 1 / 150  # outline thickness as a share of min(H, W) (at least 1 px)
    caption_lines: int = 2  # text lines in the caption band; longer sentences end with "..."
    caption_bg: tuple[int, int, int] = (20, 20, 20)  # caption band colour
    caption_fg: tuple[int, int, int] = (240, 240, 240)  # caption text colour
    tile_width: int = 160  # width of one query tile in query_grid, pixels
    grid_cols: int = 6  # query tiles per row
    heat_color: tuple[int, int, int] = (255, 32, 32)  # colour of a query mask's probability
    heat_alpha: float = 0.7  # opacity of a query mask at probability 1


STYLE = Style()


# --------------------------------------------------------------------------- helpers


def _rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 array [H, W] / [H, W, 3]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise RefbenchError(f"image must be a PIL image or uint8 [H, W(, 3)], got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def _mask(mask: Any, size: tuple[int, int], what: str) -> np.ndarray:
    """A boolean [H, W] array (nonzero = foreground) that must match the image size (W, H)."""
    arr = np.asarray(mask)
    if arr.shape != (size[1], size[0]):
        raise RefbenchError(f"{what} has shape {arr.shape}, the image is {size[1]}x{size[0]} (HxW)")
    return arr.astype(bool)


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _font_px(width: int) -> int:
    return int(min(18, max(10, width // 32)))


def caption_height(width: int, style: Style = STYLE) -> int:
    """Height in pixels of the caption band `overlay` adds under an image `width` wide."""
    px = _font_px(width)
    return style.caption_lines * (px + 4) + 8


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with '...' if text was cut."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if measure(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and measure(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def _caption(image: Image.Image, text: str, style: Style) -> Image.Image:
    w, h = image.size
    band = caption_height(w, style)
    px = _font_px(w)
    font = _font(px)
    out = Image.new("RGB", (w, h + band), style.caption_bg)
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(_wrap(text, font, w - 8, style.caption_lines)):
        draw.text((4, h + 4 + i * (px + 4)), line, fill=style.caption_fg, font=font)
    return out


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Boundary pixels of a boolean mask [H, W], `thickness` pixels wide (inside the mask)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * thickness + 1))) > 0
    return mask & ~eroded


# --------------------------------------------------------------------------- overlay


def overlay(
    image: Any,
    gt_mask: Any | None,
    pred_mask: Any,
    sentence: str,
    iou: float | None,
    style: Style = STYLE,
) -> Image.Image:
    """The image with the prediction filled, the GT outlined, and an IoU + sentence caption.

    image: PIL image or uint8 [H, W, 3]; masks: [H, W], nonzero = foreground, at the image's
    size (`gt_mask=None` draws no outline, `iou=None` leaves the IoU out, as for `predict`).
    Returns an RGB image of size (W, H + caption_height(W)).
    """
    base = _rgb(image)
    pred = _mask(pred_mask, base.size, "prediction mask")
    arr = np.asarray(base, dtype=np.float32)  # [H, W, 3]
    fill = np.asarray(style.pred_color, dtype=np.float32)  # [3]
    arr[pred] = (1 - style.pred_alpha) * arr[pred] + style.pred_alpha * fill
    if gt_mask is not None:
        gt = _mask(gt_mask, base.size, "GT mask")
        thickness = max(1, round(min(base.size) * style.gt_width_frac))
        arr[_outline(gt, thickness)] = style.gt_color
    drawn = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
    text = sentence if iou is None else f"IoU {iou:.3f} | {sentence}"
    return _caption(drawn, text, style)


# --------------------------------------------------------------------------- query grid


def query_grid(image: Any, query_masks: Any, weights: Any, style: Style = STYLE) -> Image.Image:
    """EAVL's per-query masks as tiles, sorted by their estimator weight (largest first).

    query_masks: [Q, h, w] probabilities in [0, 1] (sigmoid of the per-query logits, any
    resolution; resized to the tile); weights: [Q] the Multi-Query Estimator's weights.
    Each tile is the image with the mask as a heat overlay and "q<index> w=<weight>" below.
    Returns an RGB image of size (cols * tile_w, rows * (tile_h + label_h)), with
    cols = min(Q, style.grid_cols), tile_w = style.tile_width, tile_h keeping the aspect ratio
    and label_h = caption band of one line (see `grid_size`).
    """
    base = _rgb(image)
    masks = np.asarray(query_masks, dtype=np.float32)  # [Q, h, w]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)  # [Q]
    if masks.ndim != 3 or masks.shape[0] != w.shape[0] or masks.shape[0] == 0:
        raise RefbenchError(
            f"query masks must be [Q, h, w] with one weight per query, got masks {masks.shape} and weights {w.shape}"
        )
    if not np.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
        raise RefbenchError("query masks must be probabilities in [0, 1] (apply sigmoid to the logits)")
    cols, rows, tile_w, tile_h, label_h = _grid_geometry(base.size, masks.shape[0], style)
    thumb = np.asarray(base.resize((tile_w, tile_h), Image.BILINEAR), dtype=np.float32)  # [th, tw, 3]
    heat = np.asarray(style.heat_color, dtype=np.float32)  # [3]
    one_line = replace(style, caption_lines=1)
    out = Image.new("RGB", (cols * tile_w, rows * (tile_h + label_h)), style.caption_bg)
    order = np.argsort(-w, kind="stable")  # largest weight first
    for slot, q in enumerate(order):
        m = Image.fromarray(masks[q]).resize((tile_w, tile_h), Image.BILINEAR)  # mode F
        alpha = np.asarray(m, dtype=np.float32)[..., None].clip(0, 1) * style.heat_alpha  # [th, tw, 1]
        tile = Image.fromarray(((1 - alpha) * thumb + alpha * heat).round().clip(0, 255).astype(np.uint8))
        tile = _caption(tile, f"q{q} w={w[q]:.3f}", one_line)
        out.paste(tile, ((slot % cols) * tile_w, (slot // cols) * (tile_h + label_h)))
    return out


def _grid_geometry(size: tuple[int, int], queries: int, style: Style) -> tuple[int, int, int, int, int]:
    width, height = size
    cols = min(queries, style.grid_cols)
    rows = math.ceil(queries / cols)
    tile_w = style.tile_width
    tile_h = max(1, round(height * tile_w / width))
    label_h = caption_height(tile_w, replace(style, caption_lines=1))
    return cols, rows, tile_w, tile_h, label_h


def grid_size(image_size: tuple[int, int], queries: int, style: Style = STYLE) -> tuple[int, int]:
    """The (width, height) `query_grid` returns for an image of `image_size` (W, H) and Q queries."""
    cols, rows, tile_w, tile_h, label_h = _grid_geometry(image_size, queries, style)
    return cols * tile_w, rows * (tile_h + label_h)


# --------------------------------------------------------------------------- choosing and saving


def pick_examples(ious: Any, n: int, seed: int = 0) -> dict[str, list[int]]:
    """Indices of sentences to draw: {"best": [...], "worst": [...], "random": [...]}.

    n is shared out best, worst, random (n = 5: 2 best, 2 worst, 1 random); no index appears
    twice; with n >= len(ious) every index is used. Best is by IoU descending, worst ascending,
    ties broken by index; random is drawn (seeded) from the rest.
    """
    values = np.asarray(ious, dtype=np.float64).reshape(-1)  # [S]
    if n < 0:
        raise RefbenchError(f"number of examples must be >= 0, got {n}")
    n = min(n, values.size)
    n_best = n // 3 + (n % 3 >= 1)
    n_worst = n // 3 + (n % 3 >= 2)
    n_random = n - n_best - n_worst
    idx = np.arange(values.size)
    best = np.lexsort((idx, -values))[:n_best]  # IoU descending, then index
    rest = np.setdiff1d(idx, best)
    worst = rest[np.lexsort((rest, values[rest]))][:n_worst]  # IoU ascending, then index
    rest = np.setdiff1d(rest, worst)
    rng = np.random.default_rng(seed)
    random = np.sort(rng.choice(rest, size=n_random, replace=False)) if n_random else rest[:0]
    return {"best": best.tolist(), "worst": worst.tolist(), "random": random.tolist()}


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG atomically (temp file + rename); returns the path."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fsutil.atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- running a model for pictures


def _predict_one(net: Any, image: Image.Image, tokens: Any, device: Any, query_size: tuple[int, int] | None = None,
                 preprocess: str = "letterbox", rgb: np.ndarray | None = None, jpeg: bytes | None = None) -> dict[str, Any]:
    """Run `net` on one PIL image and one token row; maps back to the original size.

    `preprocess` (a protocol's, refbench.eval.metrics.Protocol): "letterbox" (refbench.data.transforms,
    mapped back bilinearly) or "cris" (refbench.data.cvwarp: CRIS's cubic warp in and out); `rgb`,
    the image as uint8 [H, W, 3] when the caller decoded it as the protocol does (OpenCV for
    "cris"), else taken from `image`; `jpeg`, the image's bytes when it comes from a shard: under
    "letterbox" they are decoded as the loaders decode them (`transforms.decode_image`, M/8
    scaled), so the network gets bitwise the input it was scored with. Returns {"prob": float [H, W] in [0, 1], "query_probs":
    float [Q, H, W] or None, "query_weights": float [Q] or None, "input_prob": float [h, w] over
    the square input, "frame": the input frame (a transforms.Letterbox or a cvwarp.CrisWarp)}.
    With `query_size` (w, h) the query maps come at that size instead of the image's (a
    thumbnail for `query_grid`: Q maps at full size can outweigh the photo).
    """
    import torch

    from refbench.data import cvwarp, transforms
    from refbench.distributed import exact_float32

    if preprocess == "cris":
        warped, frame = cvwarp.warp_image(np.asarray(image.convert("RGB")) if rgb is None else rgb, net.image_size)
        x = cvwarp.normalize(warped)

        def back(probs, size):  # [N,1,h,w] -> N float32 maps at `size` (w, h), or at the image's
            warp = frame if size is None else cvwarp.CrisWarp.fit(size[0], size[1], frame.size)
            return cvwarp.cris_to_original(probs, [warp] * probs.shape[0])
    elif preprocess == "letterbox":
        if jpeg is not None:  # as the loaders decode it: the scored input exactly
            small, frame = transforms.decode_image(jpeg, net.image_size)
            x = transforms.letterbox_tensor(small, frame)  # [3, S, S]
        else:
            x, frame = transforms.image_to_tensor(image, net.image_size)

        def back(probs, size):
            box = frame if size is None else _rebox(frame, *size)
            return [m.cpu().numpy() for m in transforms.to_original(probs, [box] * probs.shape[0])]
    else:
        raise ValueError(f"unknown preprocess {preprocess!r}: 'letterbox' or 'cris'")
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).reshape(1, -1).to(device)
    with torch.inference_mode(), exact_float32():
        out = net(x[None].to(device), t)
    probs = torch.sigmoid(out["logits"].float())  # [1, 1, h, w]
    result = {"prob": back(probs, None)[0], "query_probs": None, "query_weights": None,
              "input_prob": probs[0, 0].cpu(), "frame": frame}
    if "query_masks" in out and "query_weights" in out:
        q = torch.sigmoid(out["query_masks"][0].float())[:, None]  # [Q, 1, h, w]
        result["query_probs"] = np.stack(back(q, query_size))
        result["query_weights"] = out["query_weights"][0].float().cpu().numpy()
    return result


def _rebox(box: Any, width: int, height: int) -> Any:
    """The letterbox `box` (the input frame the model saw) for the same picture at another size."""
    return replace(box, orig_w=width, orig_h=height, scale=min(box.size / width, box.size / height))


def _mask_bands(input_prob: Any, frame: Any, size: tuple[int, int], threshold: float, band: int = 256):
    """Bands of rows (uint8 [<=band, W], 0/255) of the binary mask at `size` (w, h) of a
    probability map over the input frame, mapped back as the frame's protocol does."""
    from refbench.data import cvwarp

    if isinstance(frame, cvwarp.CrisWarp):
        return _cris_mask_bands(input_prob, frame, size, threshold, band)
    return _letterbox_mask_bands(input_prob, frame, size, threshold, band)


def _cris_mask_bands(input_prob: Any, warp: Any, size: tuple[int, int], threshold: float, band: int = 256):
    """`_mask_bands` for the `cris` protocol: `cvwarp.cris_to_original` (bicubic to S x S, then
    OpenCV's cubic warp by M^-1), computed `band` rows at a time. Each band is the same warp with
    the output rows shifted (its source coordinates are those of the whole warp's rows), so no
    float map ever exists at the photo's full size."""
    import cv2

    from refbench.data import cvwarp

    width, height = size
    full = cvwarp.CrisWarp.fit(width, height, warp.size)
    square = cvwarp.input_square(input_prob[None, None], warp.size)[0]  # float32 [S, S]
    to_input = cv2.invertAffineTransform(full.mat_inv)  # original pixel -> input pixel, as warpAffine inverts M^-1
    for y in range(0, height, band):
        rows = min(band, height - y)
        shifted = to_input.copy()
        shifted[:, 2] += to_input[:, 1] * y  # the band's row 0 is the image's row y
        warped = cv2.warpAffine(square, shifted, (width, rows), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                borderValue=0.0)
        yield (warped > threshold).view(np.uint8) * np.uint8(255)  # [rows, W]


def _letterbox_mask_bands(input_prob: Any, box: Any, size: tuple[int, int], threshold: float, band: int = 256):
    """Bands of rows (uint8 [<=band, W], 0/255) of the binary mask at `size` (w, h) of a
    probability map over the input frame.

    The original protocol's mapping (`transforms.to_original`: bilinear from the map to each
    pixel centre, then `> threshold`), computed `band` rows at a time, so that neither a float
    map nor the mask itself ever exists at the photo's full size.
    """
    import torch

    from refbench.data import transforms

    width, height = size
    full = _rebox(box, width, height)
    h, w = input_prob.shape
    c0, c1, cw0, cw1 = transforms._resample_taps(width, w, [(width, full.new_w / width, full.pad_x)], full.size)  # [1, W]
    cols = torch.zeros(width, w, dtype=torch.float64)
    cols.scatter_add_(1, c0[0, :, None], cw0[0, :, None])
    cols.scatter_add_(1, c1[0, :, None], cw1[0, :, None])
    right = input_prob.float() @ cols.float().T  # [h, W]
    r0, r1, rw0, rw1 = transforms._resample_taps(height, h, [(height, full.new_h / height, full.pad_y)], full.size)  # [1, H]
    r0, r1, rw0, rw1 = r0[0], r1[0], rw0[0].float()[:, None], rw1[0].float()[:, None]
    for y in range(0, height, band):
        top = right.index_select(0, r0[y:y + band]).mul_(rw0[y:y + band])
        bottom = right.index_select(0, r1[y:y + band]).mul_(rw1[y:y + band])
        yield (top.add_(bottom) > threshold).numpy().view(np.uint8) * np.uint8(255)  # [band, W]


def write_mask_png(path: str | Path, bands: Any, size: tuple[int, int]) -> Path:
    """Write an 8-bit greyscale PNG from bands of rows (uint8 [n, W]), streaming, atomically.

    What `save_png` of a mode-L image writes (a standard PNG, filter 0 per row), but the image is
    compressed as its rows arrive, so a 100-megapixel mask needs memory for one band only.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    width, height = size
    z = zlib.compressobj(6)
    with fsutil.atomic_write(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        rows = 0
        for block in bands:
            framed = np.zeros((block.shape[0], width + 1), dtype=np.uint8)  # filter byte 0, then the row
            framed[:, 1:] = block
            rows += block.shape[0]
            data = z.compress(framed.tobytes())
            if data:
                f.write(chunk(b"IDAT", data))
        if rows != height:
            raise ValueError(f"mask PNG {path}: {rows} rows written, {height} expected")
        f.write(chunk(b"IDAT", z.flush()) + chunk(b"IEND", b""))
    return Path(path)


def render_examples(net: Any, dataset_dir: Path, manifest: dict, split: str, scores: Any, n: int,
                    out_dir: Path, device: Any, seed: int = 0, preprocess: str = "letterbox") -> list[Path]:
    """`refbench eval --vis N`: overlays of the best, worst and random sentences of a split.

    `scores` is the split's `evaluate.SplitScores`; the chosen sentences are found again in the
    split's shards (JSON parsed, only their JPEGs decoded), re-run through the model, and drawn
    as `<out_dir>/<kind>-<k>-sent<sent_id>.png`, plus `...-queries.png` for models that expose
    per-query masks (EAVL). `preprocess` is the scored protocol's: the picture shows the scored mask.
    """
    import json

    from refbench.data import cvwarp
    from refbench.data import shards as data
    from refbench.data.sources import refer
    from refbench.eval import metrics

    cols = scores.columns
    ious = metrics.iou(cols["I"], cols["U"])
    picks = pick_examples(ious, n, seed=seed)
    wanted = {cols["sent_id"][i]: (kind, k, float(ious[i])) for kind, idx in picks.items() for k, i in enumerate(idx)}
    written: list[Path] = []
    net.eval()
    # every shard of the split, in this one process: no node or worker split (rank 0 draws
    # while the other ranks of a torchrun eval wait)
    for sample in data.split_samples(manifest, dataset_dir, split):
        meta = json.loads(sample["json"])
        hits = [(ref, s) for ref in meta["refs"] for s in ref["sentences"] if s["sent_id"] in wanted]
        if not hits:
            continue
        rgb = cvwarp.decode_rgb(sample["jpg"]) if preprocess == "cris" else None  # decoded as the protocol does
        image = Image.fromarray(rgb) if rgb is not None else Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        for ref, s in hits:
            kind, k, iou_value = wanted[s["sent_id"]]
            pred = _predict_one(net, image, s["tokens"], device, preprocess=preprocess, rgb=rgb,
                                jpeg=sample["jpg"] if preprocess == "letterbox" else None)
            gt = refer.decode_mask(ref["mask"])
            stem = f"{kind}-{k}-sent{s['sent_id']}"
            written.append(save_png(overlay(image, gt, pred["prob"] > net.threshold, s["sent"], iou_value),
                                    out_dir / f"{stem}.png"))
            if pred["query_probs"] is not None:
                written.append(save_png(query_grid(image, pred["query_probs"], pred["query_weights"]),
                                        out_dir / f"{stem}-queries.png"))
    return written


def predict_device():
    """Where `refbench predict` runs the model: the (first visible) GPU when there is one."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


PREDICT_SIDE = 1024  # longest side (pixels) at which `refbench predict` decodes and draws a photo
_EXIF_TRANSPOSE = {  # EXIF Orientation tag value -> the transpose that shows the photo upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Photo:
    """A user's photo as `refbench predict` sees it: upright, RGB, at most PREDICT_SIDE pixels."""

    image: Image.Image  # RGB, upright (EXIF orientation applied), longest side <= the working side
    size: tuple[int, int]  # (width, height) of the full photo, upright: the mask PNG's size
    orientation: int  # the EXIF Orientation tag it had (1 = stored upright)


def load_photo(path: Path, side: int = PREDICT_SIDE) -> Photo:
    """Decode a user's photo for prediction, in memory bounded by `side`, not by the photo.

    - JPEG: decoded at reduced scale in the DCT (1/2 .. 1/8, `draft`), the largest reduction
      that keeps the longest side >= `side`: a 100-megapixel JPEG never exists at full size.
      Other formats are decoded whole (PNG has no reduced decode) and resized at once.
    - EXIF orientation is applied: a phone photo stored sideways is segmented upright, so
      "left" and "top" mean what the user sees. (The dataset path does the opposite: COCO
      annotations are drawn on the stored pixels, so shards and loaders never rotate.)
    - Modes: 16-bit greyscale (I;16, I) is scaled by 1/257 (not clipped to white), float (F)
      from [0, 1] or [0, 255], palette and alpha images are composed over white, CMYK and
      others converted to RGB.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decode below is bounded
            im = Image.open(path)
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            full = im.size
            scale = side / max(full)
            if im.format == "JPEG" and scale < 1:
                im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode,
                         (max(1, math.ceil(full[0] * scale)), max(1, math.ceil(full[1] * scale))))
            im.load()
    except FileNotFoundError:
        raise RefbenchError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RefbenchError(f"{path}: not a readable image ({e})") from None
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    if max(im.size) > side:
        k = side / max(im.size)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.Resampling.BILINEAR)
    if orientation in _EXIF_TRANSPOSE:
        im = im.transpose(_EXIF_TRANSPOSE[orientation])
        if orientation >= 5:
            full = (full[1], full[0])
    return Photo(image=_to_rgb(im), size=full, orientation=orientation)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of an image of any mode, with its full tonal range kept (see `load_photo`)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr.clip(0, 65535) >> 8  # 16-bit range -> 8-bit
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        arr = arr * 255 if arr.max(initial=0) <= 1 else arr
        im = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def main_predict(checkpoint: Path, image: Path, text: str, out: Path) -> dict[str, Path]:
    """`refbench predict`: one image, one sentence -> the mask PNG and an overlay beside it.

    The model sees the photo upright (EXIF applied) and decoded at reduced scale (`load_photo`),
    made into its input as its checkpoint's protocol does (refbench's letterbox, or CRIS's warp for
    a checkpoint trained or converted for `cris`); the mask PNG has the upright photo's full size
    (the model's probability map mapped to every pixel as that protocol does, then thresholded),
    the overlay the working size (longest side PREDICT_SIDE).
    Memory follows the working size and the mask, not the photo's decoded size.
    """
    from refbench import checkpoint as ckpt_mod
    from refbench.data import text as text_mod
    from refbench.eval import metrics

    out = Path(out)
    fsutil.check_output_file(out, "--out")  # before the model runs
    if not text.strip():
        raise RefbenchError("--text is empty: give the referring expression, e.g. --text \"the man in black\"")
    photo = load_photo(Path(image))
    ckpt = ckpt_mod.load(checkpoint)
    device = predict_device()
    net = ckpt_mod.build_model(ckpt, checkpoint).to(device)
    length = ckpt.get("dataset", {}).get("context_length") or 77
    tokens = text_mod.tokenize([text.lower().strip()], length)[0]
    picture = photo.image
    thumb = picture.copy()
    thumb.thumbnail((2 * STYLE.tile_width, 2 * STYLE.tile_width))  # the query grid's tiles are tile_width wide
    preprocess = metrics.get_protocol(metrics.checkpoint_protocol(ckpt)).preprocess  # the input it was trained on
    pred = _predict_one(net, picture, tokens, device, query_size=thumb.size, preprocess=preprocess)
    mask = pred["prob"] > net.threshold  # bool [h, w] at the working size
    paths = {"overlay": save_png(overlay(picture, None, mask, text, None), out.with_name(f"{out.stem}-overlay.png"))}
    if pred["query_probs"] is not None:
        paths["queries"] = save_png(query_grid(thumb, pred["query_probs"], pred["query_weights"]),
                                    out.with_name(f"{out.stem}-queries.png"))
    area = 0

    def counted(bands):
        nonlocal area
        for block in bands:
            area += int(np.count_nonzero(block))
            yield block

    paths["mask"] = write_mask_png(out, counted(_mask_bands(pred["input_prob"], pred["frame"], photo.size, net.threshold)),
                                   photo.size)
    from rich.console import Console

    total = photo.size[0] * photo.size[1]
    rotated = f", EXIF orientation {photo.orientation} applied" if photo.orientation != 1 else ""
    Console().print(f"predicted mask for {text!r}: {area} px of {photo.size[0]}x{photo.size[1]}{rotated} "
                    f"({100 * area / total:.1f}% of the image, threshold {net.threshold} on sigmoid, float32 on "
                    f"{device.type}, {preprocess} preprocessing) -> "
                    f"{paths['mask']}, overlay {paths['overlay']}")
    return paths
