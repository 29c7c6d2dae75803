"""The `cris` protocol: CRIS's OpenCV chain (refbench.data.cvwarp), its strict Pr@X, its records.

Parity of the whole chain with CRIS's own inference code (same I and U per sentence) is in
tests/models/test_cris_parity.py; here: the geometry of CRIS's letterbox, the strict Pr@X rule, the
inverse warp on a known map, and `refbench eval --protocol cris` end to end on the synthetic
shards (a readable record that names the protocol, its version and its Pr@X rule).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from _harness import DATASET, assert_cli_ok, cli

from refbench.data import cvwarp
from refbench.eval import metrics, results


def test_cris_letterbox_matrices_use_float_offsets():
    w = cvwarp.CrisWarp.fit(640, 427, 416)  # scale 0.65, new height 277.55, offset (416 - 277.55) / 2
    np.testing.assert_allclose(w.mat, [[0.65, 0, 0], [0, 0.65, (416 - 427 * 0.65) / 2]], atol=1e-5)
    np.testing.assert_allclose(w.mat_inv[:, :2], [[1 / 0.65, 0], [0, 1 / 0.65]], atol=1e-5)
    corner = w.mat_inv @ np.array([0.0, (416 - 427 * 0.65) / 2, 1.0])
    np.testing.assert_allclose(corner, [0, 0], atol=1e-3)


def test_image_border_is_the_clip_mean_and_normalises_near_zero():
    rgb = np.full((50, 200, 3), 255, np.uint8)  # wide: padding above and below
    warped, warp = cvwarp.warp_image(rgb, 64)
    assert tuple(warped[0, 32]) == (123, 117, 104)  # mean * 255, saturated to uint8 by OpenCV
    x = cvwarp.normalize(warped)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x[:, 0, 32].abs().max() < 0.01 and x[:, 32, 32].min() > 1.5  # border ~0, white > 1.5


def test_strict_pr_differs_only_on_exact_ties():
    inter, union = np.array([7, 5, 9, 0]), np.array([10, 10, 10, 0])
    loose, strict = metrics.summarize(inter, union), metrics.summarize(inter, union, strict=True)
    assert loose["Pr@0.7"] == 0.5 and strict["Pr@0.7"] == 0.25  # IoU 0.7 passes >= only
    assert loose["Pr@0.5"] == 0.75 and strict["Pr@0.5"] == 0.5
    assert loose["mIoU"] == strict["mIoU"] and loose["oIoU"] == strict["oIoU"]
    assert metrics.get_protocol("cris").pr_strict and not metrics.get_protocol("original").pr_strict


def test_inverse_warp_is_cris_bicubic_then_cubic_warp():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((2, 1, 8, 8), dtype=np.float32))
    warps = [cvwarp.CrisWarp.fit(50, 30, 32), cvwarp.CrisWarp.fit(20, 44, 32)]
    maps = cvwarp.cris_to_original(probs, warps)
    assert [m.shape for m in maps] == [(30, 50), (44, 20)]
    for p, m, w in zip(probs, maps, warps):
        up = torch.nn.functional.interpolate(p[None], size=(32, 32), mode="bicubic", align_corners=True)[0, 0].numpy()
        want = cv2.warpAffine(up, w.mat_inv, (w.orig_w, w.orig_h), flags=cv2.INTER_CUBIC, borderValue=0.0)
        np.testing.assert_array_equal(m, want)


def test_train_mask_is_soft_at_the_edges():
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 10:30] = 1
    target = cvwarp.cris_train_mask(mask, cvwarp.CrisWarp.fit(40, 30, 25))
    assert target.shape == (25, 25) and target.max() == 1.0 and target.min() == 0.0
    assert ((target > 0) & (target < 1)).any()  # INTER_LINEAR leaves soft edges, as CRIS's target


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_protocol_cris_writes_a_readable_strict_record(init_run, shards_root, tmp_path):
    assert_cli_ok(cli("eval", "--checkpoint", init_run / "best.pt", "--shards", shards_root, "--split", "testB",
                      "--protocol", "cris", "--results", tmp_path, "--workers", "0"))
    (path,) = sorted((tmp_path / DATASET / "testB").glob("*.json"))
    rec = results.load_record(path)  # recomputes every metric, Pr@X strict, from the sidecar
    want = metrics.get_protocol("cris")
    assert (rec.protocol["name"], rec.protocol["version"], rec.protocol["pr_strict"]) == ("cris", want.version, True)
    i, u = rec.sentences["I"].to_numpy(), rec.sentences["U"].to_numpy()
    assert rec.metrics["Pr@0.5"] == metrics.summarize(i, u, strict=True)["Pr@0.5"]
    assert i.sum() > 0 and (u > 0).all()


def test_train_loader_with_cris_preprocessing(shards_root):
    from refbench.data import train_stream

    (batch,) = list(train_stream.train_loader(shards_root / DATASET, batch_size=4, image_size=64, num_batches=1,
                                      preprocess="cris"))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 1, 64, 64)
    mask = batch["mask"]
    assert mask.max() == 1.0 and ((mask > 0) & (mask < 1)).any()  # CRIS's soft INTER_LINEAR target
    corner = batch["image"][:, :, 0, 0]  # letterbox border or image: finite, CLIP-normalised range
    assert torch.isfinite(batch["image"]).all() and corner.abs().max() < 3
