"""Synthetic images: a muted gradient background, the scene's objects in z order, light noise, JPEG bytes."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from refbench.data.synth.scene import COLOURS, SceneObject, SynthConfig


def noise_tile(seed: int, sigma: float, side: int = 512):
    """A side x side RGB noise image stored as 128 + noise (uint8), cropped per image."""
    noise = np.random.default_rng([seed, 2]).normal(0, sigma, (side, side, 3))  # [side, side, 3]
    return Image.fromarray(np.clip(np.round(noise) + 128, 0, 255).astype(np.uint8))


def render(objs: list[SceneObject], w: int, h: int, cfg: SynthConfig, rng, noise) -> bytes:
    """JPEG bytes of a scene: muted linear-gradient background, objects in z order, light noise."""
    hue = rng.random()
    c0 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.04, 0.18), rng.uniform(0.45, 0.85)))
    c1 = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1, rng.uniform(0.04, 0.18), rng.uniform(0.45, 0.85)))
    # a linear gradient along a random direction: its values at the 4 corners, bilinearly resized
    # (bilinear interpolation of a linear function is that function)
    phi = rng.uniform(0, 2 * np.pi)
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) @ np.array([np.cos(phi) * w, np.sin(phi) * h])
    t = (corners - corners.min()) / max(float(np.ptp(corners)), 1e-6)  # [4] in 0..1
    rgb = (c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]) * 255  # [4, 3]
    small = Image.fromarray(np.round(rgb).astype(np.uint8).reshape(2, 2, 3))
    img = small.resize((w, h), Image.BILINEAR, box=(0.5, 0.5, 1.5, 1.5))
    draw = ImageDraw.Draw(img)
    for o in objs:
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[o.colour])
        for p in o.polys:
            draw.polygon(list(zip(p[0::2], p[1::2])), fill=fill)
    oy, ox = int(rng.integers(0, noise.height - h + 1)), int(rng.integers(0, noise.width - w + 1))
    img = ImageChops.add(img, noise.crop((ox, oy, ox + w, oy + h)), scale=1.0, offset=-128)  # + noise, clipped
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()


_NOISE: dict = {}


def noise_tile_cached(seed: int, sigma: float, side: int):
    key = (seed, sigma, side)
    if key not in _NOISE:
        _NOISE.clear()
        _NOISE[key] = noise_tile(seed, sigma, side)
    return _NOISE[key]
