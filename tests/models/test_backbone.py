"""The CLIP backbone (models/clip_backbone.py): features equal open_clip's own where they
should, shapes at any input size, and pretrained weights that fail fast offline."""

from __future__ import annotations

import json
import time

import huggingface_hub.constants
import open_clip
import pytest
import torch

from refbench import models
from _model_helpers import make_tokens
from refbench.models.clip_backbone import (
    CONFIG_DIR,
    BackboneConfig,
    ClipBackbone,
    TextEncoder,
    create_clip,
    dense_attention_pool,
    register_tiny_configs,
    resize_pos_embed,
    vit_tokens,
)


@pytest.fixture(scope="module")
def tiny_rn():
    torch.manual_seed(0)
    return create_clip(BackboneConfig(clip_arch="refbench-tiny-rn")).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return create_clip(BackboneConfig(clip_arch="refbench-tiny-vit")).eval()


def test_dense_attention_pool_matches_clip_pooled_token(tiny_rn):
    visual = tiny_rn.visual
    image = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        x4 = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(image)))))
        z_bar, z = dense_attention_pool(visual.attnpool, x4)
        torch.testing.assert_close(z_bar, visual.attnpool(x4), rtol=1e-4, atol=1e-5)
    assert z.shape == (2, visual.attnpool.c_proj.out_features, 4, 4)
    # every position is a query: the spatial outputs differ from each other
    assert z.flatten(2).std(dim=2).mean() > 0


def test_vit_class_token_matches_clip_image_feature(tiny_vit):
    image = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        z_bar, z = vit_tokens(tiny_vit.visual, image)
        torch.testing.assert_close(z_bar, tiny_vit.visual(image), rtol=1e-4, atol=1e-5)
    assert z.shape == (2, tiny_vit.visual.proj.shape[1], 8, 8)


def test_resize_pos_embed():
    pos = torch.randn(1 + 4 * 4, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    resized = resize_pos_embed(pos, (7, 5))
    assert resized.shape == (1 + 35, 8)
    assert torch.equal(resized[0], pos[0])  # the global / class slot is kept


def test_text_features_match_clip_at_any_length(tiny_rn):
    text = TextEncoder(tiny_rn).eval()
    for length in (17, 22):
        tokens = make_tokens(3, length)
        padded = torch.cat([tokens, torch.zeros(3, 77 - length, dtype=torch.long)], dim=1)
        with torch.no_grad():
            feats = text(tokens)
            torch.testing.assert_close(feats.sentence, tiny_rn.encode_text(padded), rtol=1e-4, atol=1e-5)
        assert feats.words.shape == (3, length, 128)
        assert torch.equal(feats.pad, tokens == 0)


@pytest.mark.parametrize("arch", ["refbench-tiny-rn", "refbench-tiny-vit"])
@pytest.mark.parametrize("size", [128, 192])
def test_image_feature_shapes(arch, size):
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneConfig(clip_arch=arch), text=False).eval()
    with torch.no_grad():
        f = backbone.image_encoder(torch.randn(1, 3, size, size))
    s = size // 8
    assert f.v2.shape == (1, 64, s, s) and f.v3.shape == (1, 128, s // 2, s // 2)
    assert f.v4.shape == (1, 128, s // 4, s // 4) and f.vg.shape == (1, 128)


def test_vit_grid_that_is_not_stride_16(tmp_path):
    """A patch-14 ViT (like ViT-L/14, whose 480 px grid is 34 x 34) still yields the H/8, H/16,
    H/32 maps: the patch map is resized to H/16 first."""
    cfg = json.loads((CONFIG_DIR / "refbench-tiny-vit.json").read_text())
    cfg["vision_cfg"]["patch_size"] = 14
    path = tmp_path / "refbench-test-vit14.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneConfig(clip_arch="refbench-test-vit14"), text=False).eval()
    with torch.no_grad():
        z_bar, z = vit_tokens(backbone.image_encoder.visual, torch.randn(1, 3, 128, 128))
        f = backbone.image_encoder(torch.randn(1, 3, 128, 128))
    assert z.shape[-2:] == (9, 9)
    assert f.v2.shape[-2:] == (16, 16) and f.v3.shape[-2:] == (8, 8) and f.v4.shape[-2:] == (4, 4)


def test_pretrained_tag_offline_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty hub cache
    start = time.perf_counter()
    with pytest.raises(models.ModelError) as err:
        models.build("eavl", "rn50", pretrained="openai")
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "\n" not in message
    assert "offline" in message and "RN50/openai" in message and "--pretrained /path/to/RN50.pt" in message


def test_pretrained_unknown_tag_or_missing_file():
    with pytest.raises(models.ModelError, match="tags: openai"):
        models.build("cris", "rn50", pretrained="no-such-tag")
    with pytest.raises(models.ModelError, match="neither a file"):
        models.build("eavl", "tiny", pretrained="/no/such/weights.pt")


def test_pretrained_local_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model("refbench-tiny-rn")
    path = tmp_path / "tiny-clip.pt"
    torch.save(source.state_dict(), path)
    model = models.build("eavl", "tiny", pretrained=str(path))
    assert torch.equal(model.backbone.image_encoder.visual.layer3[0].conv2.weight, source.visual.layer3[0].conv2.weight)
    assert torch.equal(model.backbone.text_encoder.token_embedding.weight, source.token_embedding.weight)
    bad = tmp_path / "not-weights.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(models.ModelError, match="could not load weights"):
        models.build("eavl", "tiny", pretrained=str(bad))


def _activations(model) -> set[str]:
    """Class names of the activations inside the text transformer's MLPs."""
    return {type(m.mlp.gelu).__name__ for m in model.backbone.text_encoder.transformer.resblocks}


def test_quick_gelu_default_from_the_weights_recorded_and_overridable(tmp_path):
    from refbench.models.clip_backbone import OPENAI_ARCHS, resolve_pretrained

    path = tmp_path / "weights.pt"
    path.write_bytes(b"any file")
    for arch in ("RN50", "RN101", "ViT-B-16", "ViT-L-14"):  # OpenAI trained these with QuickGELU
        assert arch in OPENAI_ARCHS and resolve_pretrained(arch, str(path)) == (str(path), True)
    assert resolve_pretrained("refbench-tiny-rn", str(path)) == (str(path), False)
    assert resolve_pretrained("RN50", None) == (None, False)  # random init: plain GELU

    register_tiny_configs()
    torch.manual_seed(1)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.create_model("refbench-tiny-rn").state_dict(), weights)
    default = models.build("eavl", "tiny", pretrained=str(weights))
    assert default.config.quick_gelu is False and _activations(default) == {"GELU"}  # recorded, not None
    forced = models.build("eavl", "tiny", pretrained=str(weights), quick_gelu=True)
    assert forced.config.quick_gelu is True and _activations(forced) == {"QuickGELU"}


def test_quick_gelu_is_decided_for_an_openai_architecture_file(tmp_path, monkeypatch):
    """A local file for RN50 runs QuickGELU unless overridden (open_clip's create_model is
    stubbed: only the decision is under test, not the 100 MB of weights)."""
    import refbench.models.clip_backbone as cb

    seen = {}

    def create_model(arch, pretrained=None, force_quick_gelu=False, **kw):
        seen[arch] = force_quick_gelu
        raise RuntimeError("stub")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    path = tmp_path / "RN50.pt"
    path.write_bytes(b"weights")
    for override, expected in ((None, True), (False, False)):
        cfg = BackboneConfig(clip_arch="RN50", pretrained=str(path), quick_gelu=override)
        with pytest.raises(models.ModelError):
            cb.create_clip(cfg)
        assert seen["RN50"] is expected and cfg.quick_gelu is expected


def test_openai_torchscript_archive_loads(tmp_path):
    """OpenAI's original files (~/.cache/clip/RN50.pt) are TorchScript archives, which a
    weights_only torch.load refuses; they load through torch.jit, weights only."""
    import warnings

    from refbench.models.clip_backbone import is_torchscript

    register_tiny_configs()
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = open_clip.create_model("refbench-tiny-rn", jit=True)
        path = tmp_path / "RN-tiny-openai.pt"
        torch.jit.save(scripted, str(path))
        model = models.build("eavl", "tiny", pretrained=str(path))
    assert is_torchscript(str(path)) and not is_torchscript(__file__)
    assert torch.equal(model.backbone.image_encoder.visual.layer3[0].conv2.weight,
                       scripted.state_dict()["visual.layer3.0.conv2.weight"])
