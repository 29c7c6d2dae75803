"""Synthetic scenes: the generator's knobs, the shape categories, and objects placed in an image.

`SynthConfig` holds every knob of `refbench synth`; `compose` draws a scene's shapes, colours and
sizes for one group (round / angular, RefCOCO's people / objects), `place` positions them by
rejection sampling and `polygons` turns each object into the polygons it is drawn and annotated
with. Randomness comes only from the numpy Generator passed in (refbench.data.synth seeds it per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator; the defaults are the embedded dataset."""

    width: tuple[int, int] = (224, 320)  # image width range, pixels (inclusive)
    height: tuple[int, int] = (192, 272)  # image height range, pixels (inclusive)
    objects: tuple[int, int] = (3, 3)  # objects per scene (inclusive)
    min_group_objects: int = 3  # objects of the scene's target group, at least
    size: tuple[float, float] = (0.30, 0.50)  # object diameter as a fraction of the shorter side
    overlap_prob: float = 0.25  # chance that an object may overlap earlier ones
    max_overlap: float = 0.20  # then: allowed intrusion, as a fraction of the summed radii
    location_margin: float = 0.10  # left/right/top/bottom need this gap (fraction of width/height)
    size_ratio: float = 1.25  # bigger/smaller need this diameter ratio to the next candidate
    group_shapes: tuple[float, float, float] = (0.0, 0.4, 0.6)  # P(1, 2, 3 distinct shapes among the group's objects)
    group_colours: tuple[float, float, float] = (0.1, 0.4, 0.5)  # P(2, 3, 4 distinct colours among them)
    full_weight: float = 3.0  # refcoco: weight of descriptions naming colour AND shape (vs 1.0)
    location_weight: float = 1.0  # refcoco: weight of descriptions with a location word (size words: 1.5)
    generic_weight: float = 0.3  # refcoco: weight of descriptions without the shape noun ("left red one")
    cross_bar: float = 0.34  # half-width of a cross's bars, as a fraction of its radius
    ring_hole: float = 0.45  # inner radius of a ring, as a fraction of its outer radius
    star_inner: float = 0.65  # inner radius of a star, as a fraction of its outer radius
    refs_per_image: tuple[int, int] = (2, 3)  # referred objects per image and dataset (inclusive)
    sentences_per_ref: tuple[float, float, float] = (0.2, 0.35, 0.45)  # P(1, 2, 3 sentences), refcoco/+
    gref_sentences_per_ref: tuple[float, float, float] = (0.35, 0.45, 0.2)  # P(1, 2, 3 sentences), refcocog
    gref_long_prob: float = 0.05  # share of G-Ref sentences built from the long (> 22 token) template
    unc_fractions: tuple[float, float, float] = (0.08, 0.08, 0.08)  # unc val, testA, testB (rest: train)
    umd_fractions: tuple[float, float] = (0.08, 0.12)  # umd val, test (rest: train)
    google_val_fraction: float = 0.10  # google val (rest: train)
    noise_sigma: float = 5.0  # grey-level std of the image noise
    jpeg_quality: int = 90  # JPEG quality of the written images


# COCO-style categories: (id, name, group). Ids use COCO's 1..90 range with gaps.
CATEGORIES = [
    (1, "circle", "round"), (3, "ring", "round"), (5, "ellipse", "round"), (7, "semicircle", "round"),
    (44, "square", "angular"), (48, "triangle", "angular"), (52, "star", "angular"), (57, "cross", "angular"),
]
GROUPS = ("round", "angular")  # testA targets GROUPS[0] (RefCOCO's "people"), testB GROUPS[1]
CATEGORY_ID = {name: cid for cid, name, _ in CATEGORIES}
SHAPES_OF = {g: [name for _, name, grp in CATEGORIES if grp == g] for g in GROUPS}
COLOURS = {  # name -> RGB; saturated, far from the muted backgrounds
    "red": (205, 35, 35), "green": (35, 155, 55), "blue": (35, 75, 205),
    "yellow": (235, 205, 25), "purple": (135, 50, 175), "orange": (240, 125, 15),
}
COLOUR_NAMES = list(COLOURS)
# ---------------------------------------------------------------------------------- shapes


def _ngon(radius_x, radius_y, n, a0=0.0, a1=None):
    """[n, 2] points on an ellipse arc from angle a0 to a1 (full turn, open, when a1 is None)."""
    a = np.linspace(a0, a0 + 2 * np.pi, n, endpoint=False) if a1 is None else np.linspace(a0, a1, n)
    return np.stack([radius_x * np.cos(a), radius_y * np.sin(a)], 1)


def _ring(r, tilt, rng, cfg):  # two half annuli, split at a random angle
    a, hole = rng.uniform(0, np.pi), cfg.ring_hole * r
    return [np.concatenate([_ngon(r, r, 13, s, s + np.pi), _ngon(hole, hole, 13, s + np.pi, s)]) for s in (a, a + np.pi)]


def _star(r, tilt, rng, cfg):
    outer, inner = _ngon(r, r, 5, -np.pi / 2), _ngon(cfg.star_inner * r, cfg.star_inner * r, 5, -np.pi / 2 + np.pi / 5)
    return [_rotate(np.stack([outer, inner], 1).reshape(10, 2), rng.uniform(-0.3, 0.3))]


def _cross(r, tilt, rng, cfg):  # two overlapping bars
    w = cfg.cross_bar
    bar = np.array([[-1, -w], [1, -w], [1, w], [-1, w]]) * r
    return [_rotate(bar, tilt), _rotate(bar[:, ::-1], tilt)]


# category -> (radius r, tilt angle, rng, SynthConfig) -> polygons as [K, 2] arrays centred on 0 (bbox ~ 2r)
SHAPE_BUILDERS = {
    "circle": lambda r, tilt, rng, cfg: [_ngon(r, r, 24)],
    "ring": _ring,
    "ellipse": lambda r, tilt, rng, cfg: [_rotate(_ngon(r, r * rng.uniform(0.5, 0.62), 24), rng.uniform(0, math.pi))],
    "semicircle": lambda r, tilt, rng, cfg: [_rotate(_ngon(r, r, 15, math.pi, 2 * math.pi) + [0, r / 2], rng.uniform(-0.6, 0.6))],  # flat side down
    "square": lambda r, tilt, rng, cfg: [_rotate(_np_array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8 * r, tilt)],
    "triangle": lambda r, tilt, rng, cfg: [_rotate(_ngon(1.1 * r, 1.1 * r, 3, -math.pi / 2) + [0, 0.25 * r], tilt)],
    "star": _star,
    "cross": _cross,
}


def _np_array(x):
    return np.array(x, float)


def _shape_polygons(shape: str, d: float, rng, cfg: SynthConfig) -> list:
    """Polygons ([K, 2] arrays, centred on 0) of one object of diameter ~d."""
    return SHAPE_BUILDERS[shape](d / 2, rng.uniform(-0.26, 0.26), rng, cfg)  # tilt: +-15 degrees


def _rotate(pts, angle):
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


# ---------------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    shape: str  # category name
    colour: str  # colour name
    d: float  # diameter, pixels
    cx: float = 0.0  # centre x, pixels
    cy: float = 0.0  # centre y, pixels
    polys: list | None = None  # flat [x1, y1, ...] polygons in image coordinates, rounded to 0.01


def compose(group: str, cfg: SynthConfig, rng) -> list[SceneObject]:
    """Shapes, colours and sizes of one scene: >= min_group_objects of `group`, then distractors."""
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    k = int(rng.integers(min(cfg.min_group_objects, n), n + 1))
    shapes = rng.choice(SHAPES_OF[group], size=int(rng.choice([1, 2, 3], p=list(cfg.group_shapes))), replace=False)
    colours = rng.choice(COLOUR_NAMES, size=int(rng.choice([2, 3, 4], p=list(cfg.group_colours))), replace=False)
    other = SHAPES_OF[GROUPS[1 - GROUPS.index(group)]]
    objs = [SceneObject(str(rng.choice(shapes)), str(rng.choice(colours)), 0.0) for _ in range(k)]
    objs += [SceneObject(str(rng.choice(other)), str(rng.choice(COLOUR_NAMES)), 0.0) for _ in range(n - k)]
    for o in objs:
        o.d = float(rng.uniform(*cfg.size))  # fraction of the shorter side for now
    order = rng.permutation(n)  # z order: group objects are not always at the bottom
    return [objs[i] for i in order]


def place(objs: list[SceneObject], w: int, h: int, cfg: SynthConfig, rng) -> bool:
    """Positions by rejection sampling (shrinking objects that do not fit); False if a scene fails."""
    side = min(w, h)
    placed: list[SceneObject] = []
    for o in objs:
        d = o.d * side
        overlap = cfg.max_overlap if rng.random() < cfg.overlap_prob else -0.04  # -0.04: a small gap
        for _ in range(6):
            cx = rng.uniform(d / 2, w - d / 2, 64)
            cy = rng.uniform(d / 2, h - d / 2, 64)
            ok = np.ones(64, bool)
            for p in placed:
                ok &= np.hypot(cx - p.cx, cy - p.cy) >= (d + p.d) / 2 * (1 - overlap)
            if ok.any():
                j = int(np.argmax(ok))
                o.d, o.cx, o.cy = d, float(cx[j]), float(cy[j])
                break
            d = max(d * 0.9, cfg.size[0] * side)  # shrink, never below the smallest size
        else:
            return False
        placed.append(o)
    return True


def polygons(o: SceneObject, w: int, h: int, rng, cfg: SynthConfig) -> None:
    polys = []
    for p in _shape_polygons(o.shape, o.d, rng, cfg):
        p = np.round(np.clip(p + [o.cx, o.cy], 0, [w, h]), 2)
        polys.append([float(v) for v in p.reshape(-1)])
    o.polys = polys
