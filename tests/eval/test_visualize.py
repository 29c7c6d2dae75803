"""Pictures: overlay pixels and size, the per-query grid's order and size, example picking, PNG saving."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refbench.errors import RefbenchError
from refbench.eval import visualize as vis

H, W = 60, 90


@pytest.fixture()
def scene():
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    gt = np.zeros((H, W), dtype=bool)
    gt[10:40, 10:50] = True
    pred = np.zeros((H, W), dtype=bool)
    pred[20:50, 30:80] = True
    return image, gt, pred


def test_overlay_size_and_pixels(scene):
    image, gt, pred = scene
    out = vis.overlay(image, gt, pred, "the dog on the left", 0.4321)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.size == (W, H + vis.caption_height(W))
    px = np.asarray(out)
    style = vis.STYLE
    # inside the prediction, away from the GT outline: blended towards the prediction colour
    blended = np.round((1 - style.pred_alpha) * 100 + style.pred_alpha * np.array(style.pred_color))
    np.testing.assert_array_equal(px[45, 70], blended)
    # on the GT boundary: the outline colour; inside the GT, away from its edge and the prediction: untouched
    np.testing.assert_array_equal(px[10, 20], style.gt_color)
    np.testing.assert_array_equal(px[15, 15], [100, 100, 100])
    # outside both: untouched
    np.testing.assert_array_equal(px[55, 5], [100, 100, 100])
    # the caption band: its background plus some text pixels
    band = px[H:]
    assert (band == style.caption_bg).all(axis=-1).mean() > 0.5
    assert (band != style.caption_bg).any()


def test_overlay_without_gt_and_long_sentence(scene):
    image, _, pred = scene
    long = "the man in a red shirt " * 20
    out = vis.overlay(Image.fromarray(image), None, pred, long, None)
    assert out.size == (W, H + vis.caption_height(W))  # long sentences are cut, never grow the picture
    assert not (np.asarray(out)[:H] == vis.STYLE.gt_color).all(axis=-1).any()


def test_overlay_refuses_mismatched_masks(scene):
    image, gt, pred = scene
    with pytest.raises(RefbenchError, match="prediction mask has shape"):
        vis.overlay(image, gt, pred[:, :-1], "x", 0.5)
    with pytest.raises(RefbenchError, match="GT mask has shape"):
        vis.overlay(image, gt[:-1], pred, "x", 0.5)


def test_query_grid_size_and_order(scene):
    image, _, _ = scene
    q = 8
    masks = np.zeros((q, 15, 20), dtype=np.float32)  # lower resolution than the image, as a model emits
    masks[5] = 1.0  # only query 5 lights up ...
    weights = np.linspace(0.0, 0.7, q)
    weights[5] = 0.9  # ... and it has the largest weight, so it is the first tile
    out = vis.query_grid(image, masks, weights)
    assert out.size == vis.grid_size((W, H), q)
    cols = min(q, vis.STYLE.grid_cols)
    tile_w = vis.STYLE.tile_width
    tile_h = round(H * tile_w / W)
    assert out.size[0] == cols * tile_w
    px = np.asarray(out).astype(int)
    first, second = px[tile_h // 2, tile_w // 2], px[tile_h // 2, tile_w + tile_w // 2]
    np.testing.assert_array_equal(second, [100, 100, 100])  # a zero mask leaves the image as is
    assert first[0] > 200 and first[1] < 100  # the heat colour


def test_query_grid_refuses_logits_and_shape_mismatch(scene):
    image, _, _ = scene
    with pytest.raises(RefbenchError, match="probabilities"):
        vis.query_grid(image, np.full((2, 4, 4), 3.0), [0.5, 0.5])
    with pytest.raises(RefbenchError, match="one weight per query"):
        vis.query_grid(image, np.zeros((3, 4, 4)), [0.5, 0.5])


def test_pick_examples():
    ious = [0.1, 0.9, 0.5, 0.5, 0.2, 0.95, 0.0, 0.3]
    picked = vis.pick_examples(ious, 5, seed=0)
    assert picked["best"] == [5, 1] and picked["worst"] == [6, 0]
    assert len(picked["random"]) == 1 and picked["random"][0] in {2, 3, 4, 7}
    assert picked == vis.pick_examples(ious, 5, seed=0)
    every = vis.pick_examples(ious, 50, seed=1)
    assert sorted(every["best"] + every["worst"] + every["random"]) == list(range(len(ious)))
    assert vis.pick_examples(ious, 0) == {"best": [], "worst": [], "random": []}
    assert vis.pick_examples([0.5, 0.5, 0.5], 2)["best"] == [0]  # ties broken by index


def test_save_png_round_trip(scene, tmp_path):
    image, gt, pred = scene
    out = vis.overlay(image, gt, pred, "x", 1.0)
    path = vis.save_png(out, tmp_path / "sub" / "x.png")
    back = Image.open(path)
    assert back.size == out.size
    np.testing.assert_array_equal(np.asarray(back.convert("RGB")), np.asarray(out))
    assert not list((tmp_path / "sub").glob(".tmp-*"))


def test_prediction_runs_in_exact_float32():
    """predict and eval --vis run the model with TF32 off (cuDNN allows it by default): a GPU's
    mask then differs from the CPU's by float32 rounding only. The flags are restored after."""
    import torch

    from refbench.eval import visualize

    seen = []

    class Net(torch.nn.Module):
        image_size = 32

        def forward(self, image, tokens):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return {"logits": torch.zeros(image.shape[0], 1, 8, 8)}

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    image = Image.new("RGB", (40, 30), (120, 60, 30))
    result = visualize._predict_one(Net(), image, [49406, 320, 49407], torch.device("cpu"))
    assert seen == [(False, False)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    assert result["prob"].shape == (30, 40)
