"""Letterbox geometry, normalisation, masks into the input frame and the inverse map back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from refbench.data import transforms as T
from refbench.data.transforms import Letterbox


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _ellipse(h: int, w: int) -> np.ndarray:
    """An off-centre ellipse covering about a fifth of an h x w image: uint8 [h, w]."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return ((((yy - 0.4 * h) / (0.3 * h)) ** 2 + ((xx - 0.6 * w) / (0.25 * w)) ** 2) <= 1).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(
    "w,h,size,expect",
    [
        (640, 427, 480, (480, 320, 0, 80)),  # landscape COCO
        (427, 640, 480, (320, 480, 80, 0)),  # portrait
        (500, 500, 480, (480, 480, 0, 0)),  # square
        (37, 53, 128, (89, 128, 19, 0)),  # odd, upscaled
        (1, 1000, 64, (1, 64, 31, 0)),  # degenerate sliver keeps one column
    ],
)
def test_letterbox_geometry(w, h, size, expect):
    box = Letterbox.fit(w, h, size)
    assert (box.new_w, box.new_h, box.pad_x, box.pad_y) == expect
    assert max(box.new_w, box.new_h) == size
    assert box.pad_x + box.new_w <= size and box.pad_y + box.new_h <= size
    assert box.scale == pytest.approx(min(size / w, size / h))


def test_letterbox_rejects_empty_image():
    with pytest.raises(ValueError):
        Letterbox.fit(0, 10, 480)


@pytest.mark.parametrize("w,h", [(64, 40), (33, 61), (50, 50)])
def test_image_pad_is_zero_and_content_is_clip_normalised(w, h):
    colour = np.array([200, 30, 120], dtype=np.uint8)
    img = Image.fromarray(np.broadcast_to(colour, (h, w, 3)).copy())  # PNG-like, no JPEG loss
    x, box = T.image_to_tensor(img, 96)
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    inside = torch.zeros(96, 96, dtype=torch.bool)
    inside[box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w] = True
    assert torch.all(x[:, ~inside] == 0)
    expected = (torch.tensor(colour / 255.0) - torch.tensor(T.CLIP_MEAN)) / torch.tensor(T.CLIP_STD)
    assert torch.allclose(x[:, inside], expected.float()[:, None], atol=1e-5)


def test_normalize_of_mean_colour_is_zero_and_writes_into_out():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    box = Letterbox.fit(20, 10, 20)
    out = torch.full((3, 20, 20), 7.0)
    y = T.normalize(rgb, box, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.allclose(y[:, 5:15], (-torch.tensor(T.CLIP_MEAN) / torch.tensor(T.CLIP_STD))[:, None, None].float())
    assert torch.all(y[:, :5] == 0) and torch.all(y[:, 15:] == 0)
    with pytest.raises(ValueError):
        T.normalize(rgb[:, :5], box)


@pytest.mark.parametrize("w,h,size", [(640, 480, 480), (500, 375, 480), (37, 53, 128), (300, 200, 128)])
def test_resize_matches_pil_bilinear(w, h, size):
    """The torch uint8 path equals PIL's bilinear resize (down- and upscaling, no draft)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    rgb, box = T.resize_image(img, size)
    expected = np.asarray(img.resize((box.new_w, box.new_h), Image.Resampling.BILINEAR))
    assert rgb.shape == expected.shape and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= 1


def test_jpeg_draft_path_keeps_geometry():
    """A large JPEG decoded at reduced DCT scale lands at the same place as an exact resize."""
    h, w = 700, 1000
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, : int(w * 0.3)] = 255  # white band on the left 30%
    pixels[int(h * 0.6) :, :] = 128  # grey band on the bottom 40%
    rgb, box = T.decode_image(_jpeg(pixels), 128)  # 1000 / 128 > 4: draft applies
    assert rgb.shape == (box.new_h, box.new_w, 3) == (90, 128, 3)
    exact = np.asarray(Image.fromarray(pixels).resize((box.new_w, box.new_h), Image.Resampling.BILINEAR))
    assert np.abs(rgb.astype(int) - exact.astype(int)).mean() < 3.0
    edge = np.argmax(rgb[10, :, 0] < 128)  # first dark column on a top row
    assert abs(edge - 0.3 * box.new_w) <= 1
    row = np.argmax(rgb[:, 100, 0] > 64)  # first grey row right of the white band
    assert abs(row - 0.6 * box.new_h) <= 1


def test_grayscale_jpeg_becomes_rgb():
    gray = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG")
    rgb, box = T.decode_image(buf.getvalue(), 64)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_mask_to_input_places_mask_and_pads_with_zero():
    mask = np.ones((30, 60), dtype=np.uint8)
    box = Letterbox.fit(60, 30, 64)
    m = T.mask_to_input(mask, box)
    assert m.shape == (64, 64) and m.dtype == np.uint8
    assert m.sum() == box.new_w * box.new_h
    assert m[box.pad_y : box.pad_y + box.new_h].all() and not m[: box.pad_y].any()
    t = T.mask_to_tensor(mask, box)
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32 and set(t.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError):
        T.mask_to_input(mask.T, box)
    rng = np.random.default_rng(0)
    noisy = (rng.random((30, 60)) > 0.5).astype(np.uint8)
    assert np.array_equal(T.mask_to_input(np.asfortranarray(noisy), box), T.mask_to_input(noisy, box))  # pycocotools order


@pytest.mark.parametrize("size", [64, 128, 480])
def test_mask_round_trip_through_input_frame(size):
    """original -> input frame (nearest) -> back (bilinear, batched, mixed sizes): IoU ~ 1."""
    shapes = [(427, 640), (640, 427), (53, 37), (61, 33), (100, 100)]  # (H, W)
    masks = [_ellipse(h, w) for h, w in shapes]
    boxes = [Letterbox.fit(w, h, size) for h, w in shapes]
    probs = torch.stack([T.mask_to_tensor(m, b) for m, b in zip(masks, boxes)])  # [B, 1, S, S]
    for res in (size, size // 4):  # at the input resolution and at a stride-4 decoder's
        p = torch.nn.functional.interpolate(probs, size=(res, res), mode="bilinear", align_corners=False)
        back = T.to_original(p, boxes)
        for m, b, out in zip(masks, boxes, back):
            assert out.shape == (b.orig_h, b.orig_w) and out.dtype == torch.float32
            # the boundary may move by under a pixel of the coarsest grid the mask passed through;
            # 1 - IoU of a disc of radius r whose edge moves by d pixels is about 2d / r
            radius = 0.25 * min(b.orig_w, b.orig_h, b.new_w * res / size, b.new_h * res / size)
            floor = 1 - 0.75 / radius
            assert _iou(out.numpy() > 0.5, m) >= floor, (b, res)


def test_to_original_is_exact_on_a_linear_ramp():
    """Bilinear sampling reproduces a linear function: the map lands on exact original coordinates."""
    size, w, h = 96, 50, 30
    box = Letterbox.fit(w, h, size)
    u = torch.arange(size, dtype=torch.float64) + 0.5  # input pixel centres
    ramp_x = (u - box.pad_x) * (w / box.new_w)  # original x coordinate of each input column
    ramp_y = (u - box.pad_y) * (h / box.new_h)
    probs = torch.stack([ramp_x.expand(size, size), ramp_y[:, None].expand(size, size)])[:, None]  # [2, 1, S, S]
    out_x, out_y = T.to_original(probs, [box, box])
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    assert torch.allclose(out_x, xs.expand(h, w), atol=1e-9)
    assert torch.allclose(out_y, ys[:, None].expand(h, w), atol=1e-9)


def test_to_original_rejects_mismatched_batch():
    with pytest.raises(ValueError):
        T.to_original(torch.zeros(2, 1, 8, 8), [Letterbox.fit(4, 4, 8)])
    assert T.to_original(torch.zeros(0, 1, 8, 8), []) == []


@pytest.mark.parametrize("cells", [24, 96])
def test_to_original_equals_a_float64_grid_sample(cells):
    """The separable matmul form computes what grid_sample (bilinear, border, align_corners=False)
    computes at every original pixel centre, to float32 precision, for any image shape."""
    import torch.nn.functional as F

    rng = np.random.default_rng(cells)
    boxes = [Letterbox.fit(int(w), int(h), 96) for w, h in rng.integers(30, 700, (4, 2))]
    probs = torch.from_numpy(rng.random((4, 1, cells, cells), dtype=np.float32))
    out = T.to_original(probs, boxes)
    for i, b in enumerate(boxes):
        xs = (torch.arange(b.orig_w, dtype=torch.float64) + 0.5) * b.new_w / b.orig_w + b.pad_x
        ys = (torch.arange(b.orig_h, dtype=torch.float64) + 0.5) * b.new_h / b.orig_h + b.pad_y
        grid = torch.stack(torch.meshgrid(2 * xs / b.size - 1, 2 * ys / b.size - 1, indexing="xy"), -1)[None]
        ref = F.grid_sample(probs[i:i + 1].double(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        assert out[i].shape == (b.orig_h, b.orig_w)
        assert torch.allclose(out[i].double(), ref, atol=1e-6)


def _stripes(h: int, w: int) -> np.ndarray:
    """White left 30%, grey bottom 40%, black elsewhere: uint8 [h, w, 3] with known edges."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, : int(w * 0.3)] = 255
    pixels[int(h * 0.6) :, :] = 128
    return pixels


@pytest.mark.parametrize("w,h,size,decoded", [
    (640, 480, 480, (360, 480)),  # COCO 4:3 at 480: the IDCT at 6/8 lands on the letterbox exactly
    (640, 427, 480, (321, 480)),  # 6/8 gives 321 rows for 320.25: one-row remainder resampled with its box
    (640, 427, 96, (107, 160)),  # 2/8: the smallest scale that still covers 96 x 64 (1/8 is 80 x 54)
])
def test_scaled_decode_keeps_the_letterbox_geometry(w, h, size, decoded):
    """DCT-scaled decoding lands every edge where the exact full-decode + resize puts it."""
    import simplejpeg

    jpeg = _jpeg(_stripes(h, w))
    box = Letterbox.fit(w, h, size)
    assert simplejpeg.decode_jpeg(jpeg, min_width=box.new_w, min_height=box.new_h).shape[:2] == decoded
    scaled = T.scaled_decode(jpeg, size)
    assert scaled is not None
    rgb, got = scaled
    assert got == box and rgb.shape == (box.new_h, box.new_w, 3) and rgb.dtype == np.uint8
    exact, _ = T.resize_image(Image.open(io.BytesIO(jpeg)), size)  # PIL full decode + bilinear
    assert np.abs(rgb.astype(int) - exact.astype(int)).mean() < 3.0
    edge = np.argmax(rgb[2, :, 0] < 128)  # first dark column on a top row
    assert abs(edge - 0.3 * box.new_w) <= 1
    row = np.argmax(rgb[:, -2, 0] > 64)  # first grey row at the right edge
    assert abs(row - 0.6 * box.new_h) <= 1
    assert np.array_equal(T.decode_image(jpeg, size)[0], rgb)  # decode_image takes this path


def test_scaled_decode_leaves_upscales_and_non_jpegs_to_pil():
    assert T.scaled_decode(_jpeg(_stripes(40, 60)), 96) is None  # an upscale
    buf = io.BytesIO()
    Image.fromarray(_stripes(200, 300)).save(buf, format="PNG")
    assert T.scaled_decode(buf.getvalue(), 96) is None
    rgb, box = T.decode_image(buf.getvalue(), 96)  # PIL decodes it
    assert rgb.shape == (box.new_h, box.new_w, 3)
    with pytest.raises(Exception):
        T.decode_image(b"\xff\xd8\xff\xe0 not a jpeg", 96)  # bad bytes still raise (via PIL)


@pytest.mark.parametrize("w,h", [(64, 40), (33, 61), (50, 50)])
def test_uint8_letterbox_normalised_on_the_device_equals_normalize(w, h):
    rng = np.random.default_rng(w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rgb, box = T.resize_image(img, 96)
    u8 = T.letterbox_uint8(rgb, box)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 96, 96)
    content = torch.tensor([T.content_box(box)] * 2)
    batch = torch.stack([u8, u8])
    out = T.normalize_batch(batch, content)
    ref = T.normalize(rgb, box)
    assert out.dtype == torch.float32 and torch.allclose(out[1], ref, atol=1e-5)
    pad = torch.ones(96, 96, dtype=torch.bool)
    pad[box.pad_y : box.pad_y + box.new_h, box.pad_x : box.pad_x + box.new_w] = False
    assert torch.all(out[:, :, pad] == 0)  # the padding is exactly the mean colour
    cl = T.normalize_batch(batch.contiguous(memory_format=torch.channels_last), content)
    assert torch.equal(cl, out) and cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        T.normalize_batch(batch.float(), content)


def test_to_original_batch_pads_with_exact_zeros():
    boxes = [Letterbox.fit(50, 30, 32), Letterbox.fit(20, 70, 32)]
    probs = torch.rand(2, 1, 8, 8) + 0.5  # nowhere 0
    stack = T.to_original_batch(probs, boxes)
    assert stack.shape == (2, 70, 50)
    for i, (b, m) in enumerate(zip(boxes, T.to_original(probs, boxes))):
        assert torch.equal(stack[i, : b.orig_h, : b.orig_w], m) and torch.all(m > 0)
        assert not stack[i, b.orig_h :].any() and not stack[i, :, b.orig_w :].any()
    inside = T.original_extent(boxes, 70, 50)
    assert torch.equal(inside, stack > 0)


def test_to_original_keeps_float32_under_a_callers_bf16_autocast():
    """A bf16 training run validates inside its autocast; the map back must still be float32
    (on the H100 the matmul came back bfloat16 and numpy refused it). CPU autocast rounds
    matmuls to bf16 the same way, so this is the CUDA failure reproduced on CPU."""
    import torch

    from refbench.data import transforms

    box = transforms.Letterbox.fit(37, 53, 32)
    probs = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = transforms.to_original_batch(probs, [box, box])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = transforms.to_original_batch(probs, [box, box])
    assert under.dtype == torch.float32
    assert torch.equal(under, plain)
