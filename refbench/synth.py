"""`refbench synth`: a synthetic referring dataset in exactly the raw REFER layout.

The embedded default dataset: what the tests and the CPU quickstart train on, read by the real
loaders unchanged. `main(out, images, seed)` writes

    OUT/refcoco/refs(unc).p   OUT/refcoco+/refs(unc).p   OUT/refcocog/refs(umd).p  refs(google).p
    OUT/<dataset>/instances.json (one per dataset folder, COCO style)
    OUT/images/train2014/COCO_train2014_%012d.jpg
    OUT/SYNTH.json            (marker: seed, image count; lets a re-run overwrite its own output)

Scenes. Each image (width 224..320, height 192..272, landscape and portrait) is a smooth muted
gradient with light noise and 3 flat-coloured shapes (30%..50% of the shorter side). The
categories are shapes with COCO-style ids in two groups playing RefCOCO's people/objects: "round"
(circle, ring, ellipse, semicircle) and "angular" (square, triangle, star, cross). A scene belongs
to one group: it holds at least 3 objects of it (drawn from 2-3 of its shapes and 2-4 colours, so
same-shape and same-colour distractors are common), plus distractors of the other group when
`SynthConfig.objects` allows more than 3 (the default scene has exactly 3); all its refs target objects of its group, chosen uniformly among the describable ones, so a model that
ignores language cannot do better than guessing among >= 3 objects. A ring is two half-annulus
polygons and a cross two overlapping bars (fat ones, like the star: the defaults were tuned so
that the tiny EAVL of the quickstart reaches its quality bar in ten CPU minutes) (the refer toolkit sums polygons, so the bars' overlap
reads 2 there; the GT is the nonzero union).

Overlaps and occlusion. About a quarter of the objects may overlap an earlier one by up to 20%
of their summed radii; objects are drawn in list (z) order. An annotation is the object's full
(amodal) shape, the polygons it was drawn with, also where a later object covers part of it;
overlaps are small, so the hidden part is a few pixels of the mask at most.

Annotations: instances.json lists every object (referred or not) with bbox [x, y, w, h] of its
polygons, area = pixel area of the union of its polygons (pycocotools, as COCO computes it),
iscrowd 0 and the polygons. Image and annotation ids are random unique COCO-range ints. All
three dataset folders share the images (as RefCOCO and RefCOCO+ do), so their instances.json
are identical.

Sentences identify the target uniquely among the scene's objects. A description is a subset of
{shape, colour} (the candidates: objects matching it) plus at most one relation that picks the
target among the candidates with a margin: left/right/top/bottom (and corners, middle), measured
on object centres with a 10%-of-side margin, or bigger/smaller (diameter ratio >= 1.25).
- refcoco (unc): short, mostly colour + shape, about 60% with a location word ("left red
  circle", "the square on the right", "bigger star", "bottom left blue shape"); the weights are
  `SynthConfig.full_weight`, `location_weight`, `generic_weight`.
- refcoco+ (unc, same images and splits): appearance only (colour, shape, size), never a location
  word; only objects so describable are targeted.
- refcocog (umd and google: the same refs, two split partitions): a description plus a relation to
  the nearest other object ("the red circle to the left of a blue square"), ~9 words on average;
  about 5% use a long template that exceeds 22 CLIP tokens, so truncation is exercised.
`raw` varies case and punctuation ("The RED circle, on the left."); `sent` = `clean(raw)`, the
lower-case form without punctuation; `tokens` = `sent.split()`.

Splits are image-disjoint: unc train/val/testA/testB (testA = round scenes, testB = angular
scenes; train and val mix both), umd train/val/test, google train/val; proportions in
`SynthConfig`.

Determinism: everything about image i comes from `numpy.random.default_rng([seed, 1, i])` and the
global choices (ids, groups, splits) from `default_rng([seed, 0])`; nothing reads the clock or
the pid, and the per-image work is independent of how it is spread over processes. So a seed gives
byte-identical files (on one pillow/libjpeg build) whatever the core count. JPEGs are written
first, then instances.json, then the refs pickles (protocol 2), each JSON/pickle atomically.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from refbench import __version__
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write_bytes, atomic_write_json

DEFAULT_IMAGES = 2000  # synth + prepare --all in ~15 s on 2 cores; enough for the quickstart


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
SHAPE_WORDS = {  # category -> nouns (the first is used 75% of the time)
    "circle": ["circle", "disc"], "ring": ["ring", "donut"], "ellipse": ["ellipse", "oval"],
    "semicircle": ["semicircle", "half circle"], "square": ["square", "box"],
    "triangle": ["triangle"], "star": ["star"], "cross": ["cross", "plus sign"],
}
GENERIC_NOUNS = ["shape", "object", "thing"]
LOCATION_PHRASES = {  # relation -> (prefix forms, suffix forms)
    "left": (["left"], ["on the left", "on left"]),
    "right": (["right"], ["on the right", "on right"]),
    "top": (["top", "upper"], ["at the top", "on top"]),
    "bottom": (["bottom", "lower"], ["at the bottom", "on the bottom"]),
    "top left": (["top left", "upper left"], ["in the top left"]),
    "top right": (["top right", "upper right"], ["in the top right"]),
    "bottom left": (["bottom left", "lower left"], ["in the bottom left"]),
    "bottom right": (["bottom right", "lower right"], ["in the bottom right"]),
    "middle": (["middle", "center"], ["in the middle"]),
}
SIZE_WORDS = {  # relation -> (words when 2 candidates, words when 3+)
    "big": (["bigger", "larger", "big"], ["biggest", "largest", "big"]),
    "small": (["smaller", "small", "little"], ["smallest", "small", "tiny"]),
}
# every word that locates; RefCOCO+ sentences must contain none of them
LOCATION_WORDS = frozenset(
    "left right top bottom upper lower middle center centre above below next near close beside behind front corner".split()
)
_PUNCT = re.compile(r"[^\w\s']")


def clean(raw: str) -> str:
    """The `sent` form of a `raw` expression: lower case, punctuation removed, single spaces."""
    return " ".join(_PUNCT.sub(" ", raw.lower()).split())


# ---------------------------------------------------------------------------------- shapes


def _ngon(radius_x, radius_y, n, a0=0.0, a1=None):
    """[n, 2] points on an ellipse arc from angle a0 to a1 (full turn, open, when a1 is None)."""
    import numpy as np

    a = np.linspace(a0, a0 + 2 * np.pi, n, endpoint=False) if a1 is None else np.linspace(a0, a1, n)
    return np.stack([radius_x * np.cos(a), radius_y * np.sin(a)], 1)


def _ring(r, tilt, rng, cfg):  # two half annuli, split at a random angle
    import numpy as np

    a, hole = rng.uniform(0, np.pi), cfg.ring_hole * r
    return [np.concatenate([_ngon(r, r, 13, s, s + np.pi), _ngon(hole, hole, 13, s + np.pi, s)]) for s in (a, a + np.pi)]


def _star(r, tilt, rng, cfg):
    import numpy as np

    outer, inner = _ngon(r, r, 5, -np.pi / 2), _ngon(cfg.star_inner * r, cfg.star_inner * r, 5, -np.pi / 2 + np.pi / 5)
    return [_rotate(np.stack([outer, inner], 1).reshape(10, 2), rng.uniform(-0.3, 0.3))]


def _cross(r, tilt, rng, cfg):  # two overlapping bars
    import numpy as np

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
    import numpy as np

    return np.array(x, float)


def _shape_polygons(shape: str, d: float, rng, cfg: SynthConfig) -> list:
    """Polygons ([K, 2] arrays, centred on 0) of one object of diameter ~d."""
    return SHAPE_BUILDERS[shape](d / 2, rng.uniform(-0.26, 0.26), rng, cfg)  # tilt: +-15 degrees


def _rotate(pts, angle):
    import numpy as np

    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


# ---------------------------------------------------------------------------------- scenes


@dataclass
class _Obj:
    shape: str  # category name
    colour: str  # colour name
    d: float  # diameter, pixels
    cx: float = 0.0  # centre x, pixels
    cy: float = 0.0  # centre y, pixels
    polys: list | None = None  # flat [x1, y1, ...] polygons in image coordinates, rounded to 0.01


def _compose(group: str, cfg: SynthConfig, rng) -> list[_Obj]:
    """Shapes, colours and sizes of one scene: >= min_group_objects of `group`, then distractors."""
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    k = int(rng.integers(min(cfg.min_group_objects, n), n + 1))
    shapes = rng.choice(SHAPES_OF[group], size=int(rng.choice([1, 2, 3], p=list(cfg.group_shapes))), replace=False)
    colours = rng.choice(COLOUR_NAMES, size=int(rng.choice([2, 3, 4], p=list(cfg.group_colours))), replace=False)
    other = SHAPES_OF[GROUPS[1 - GROUPS.index(group)]]
    objs = [_Obj(str(rng.choice(shapes)), str(rng.choice(colours)), 0.0) for _ in range(k)]
    objs += [_Obj(str(rng.choice(other)), str(rng.choice(COLOUR_NAMES)), 0.0) for _ in range(n - k)]
    for o in objs:
        o.d = float(rng.uniform(*cfg.size))  # fraction of the shorter side for now
    order = rng.permutation(n)  # z order: group objects are not always at the bottom
    return [objs[i] for i in order]


def _place(objs: list[_Obj], w: int, h: int, cfg: SynthConfig, rng) -> bool:
    """Positions by rejection sampling (shrinking objects that do not fit); False if a scene fails."""
    import numpy as np

    side = min(w, h)
    placed: list[_Obj] = []
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


def _polygons(o: _Obj, w: int, h: int, rng, cfg: SynthConfig) -> None:
    import numpy as np

    polys = []
    for p in _shape_polygons(o.shape, o.d, rng, cfg):
        p = np.round(np.clip(p + [o.cx, o.cy], 0, [w, h]), 2)
        polys.append([float(v) for v in p.reshape(-1)])
    o.polys = polys


# ---------------------------------------------------------------------------------- language


@dataclass(frozen=True)
class _Desc:
    shape: bool  # names the shape
    colour: bool  # names the colour
    rel: str | None  # a LOCATION_PHRASES or SIZE_WORDS key, or None
    n: int  # candidates matching shape/colour (the relation picks among them)


def _extreme(values: list[float], t: int, margin: float, largest: bool) -> bool:
    """Whether candidate t holds the smallest (largest) value, ahead of the next by `margin`."""
    v = values[t]
    others = [x for i, x in enumerate(values) if i != t]
    return all(x - v >= margin for x in others) if not largest else all(v - x >= margin for x in others)


def _descriptions(objs: list[_Obj], t: int, w: int, h: int, cfg: SynthConfig, location: bool) -> list[_Desc]:
    """Every description that picks object t out of the scene (see the module docstring)."""
    out = []
    target = objs[t]
    for use_shape in (False, True):
        for use_colour in (False, True):
            cand = [i for i, o in enumerate(objs)
                    if (not use_shape or o.shape == target.shape) and (not use_colour or o.colour == target.colour)]
            ti = cand.index(t)
            if len(cand) == 1:
                if use_shape or use_colour:
                    out.append(_Desc(use_shape, use_colour, None, 1))
                    if location:  # redundant, but true in absolute terms: "the red circle on the left"
                        for rel, ok in (("left", target.cx < w / 3), ("right", target.cx > 2 * w / 3),
                                        ("top", target.cy < h / 3), ("bottom", target.cy > 2 * h / 3)):
                            if ok:
                                out.append(_Desc(use_shape, use_colour, rel, 1))
                continue
            others = [objs[i].d for i in cand if i != t]
            rels = []
            if all(target.d >= cfg.size_ratio * x for x in others):
                rels.append("big")
            if all(x >= cfg.size_ratio * target.d for x in others):
                rels.append("small")
            if location:
                xs, ys = [objs[i].cx for i in cand], [objs[i].cy for i in cand]
                mx, my = cfg.location_margin * w, cfg.location_margin * h
                horiz = [r for r, ok in (("left", _extreme(xs, ti, mx, False)), ("right", _extreme(xs, ti, mx, True))) if ok]
                vert = [r for r, ok in (("top", _extreme(ys, ti, my, False)), ("bottom", _extreme(ys, ti, my, True))) if ok]
                rels += horiz + vert + [f"{v} {hz}" for v in vert for hz in horiz]
                if len(cand) == 3 and not horiz:
                    sx = sorted(xs)
                    if xs[ti] == sx[1] and sx[1] - sx[0] >= mx and sx[2] - sx[1] >= mx:
                        rels.append("middle")
            out += [_Desc(use_shape, use_colour, r, len(cand)) for r in rels]
    return out


def _pick(items: list, weights: list[float], rng):
    import numpy as np

    p = np.asarray(weights, float)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _noun(shape: str, rng) -> str:
    words = SHAPE_WORDS[shape]
    return words[0] if len(words) == 1 or rng.random() < 0.75 else str(rng.choice(words[1:]))


def _parts(d: _Desc, o: _Obj, rng) -> dict[str, list[str]]:
    """The pieces of a description: location prefix/suffix, size, colour and noun words."""
    parts = {"pre": [], "size": [], "colour": [o.colour] if d.colour else [], "noun": [], "post": []}
    if d.rel in SIZE_WORDS:
        parts["size"] = [str(rng.choice(SIZE_WORDS[d.rel][d.n >= 3]))]
    elif d.rel is not None:
        prefixes, suffixes = LOCATION_PHRASES[d.rel]
        if rng.random() < 0.6:
            parts["pre"] = str(rng.choice(prefixes)).split()
        else:
            parts["post"] = str(rng.choice(suffixes)).split()
    if d.shape:
        parts["noun"] = _noun(o.shape, rng).split()
    elif (parts["pre"] or parts["size"] or parts["colour"]) and rng.random() < 0.4:
        parts["noun"] = ["one"]
    else:
        parts["noun"] = [str(rng.choice(GENERIC_NOUNS))]
    return parts


def _phrase(d: _Desc, o: _Obj, rng, article: str | None) -> list[str]:
    """[article] [location prefix] [size] [colour] noun [location suffix]."""
    p = _parts(d, o, rng)
    return ([article] if article else []) + p["pre"] + p["size"] + p["colour"] + p["noun"] + p["post"]


def _refcoco_sentence(descs: list[_Desc], objs: list[_Obj], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
    """Short, location words preferred: "left red circle", "the square on the right", "bigger star"."""
    o = objs[t]
    weights = [(cfg.location_weight if d.rel in LOCATION_PHRASES else 1.5 if d.rel else 1.0)
               * (cfg.full_weight if d.shape and d.colour else 1.0) * (1.0 if d.shape else cfg.generic_weight)
               for d in descs]
    return _phrase(_pick(descs, weights, rng), o, rng, "the" if rng.random() < 0.35 else None)


def _refcocoplus_sentence(descs: list[_Desc], objs: list[_Obj], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
    """Appearance only: "red circle", "the bigger blue square", "circle in red", "green colored star"."""
    o = objs[t]
    d = _pick(descs, [2.0 if d.colour else 1.0 for d in descs], rng)
    p = _parts(d, o, rng)
    article = ["the"] if rng.random() < 0.3 else []
    if d.colour and d.shape and rng.random() < 0.25:
        if rng.random() < 0.5:
            return article + p["size"] + p["noun"] + ["in", o.colour]
        return article + p["size"] + [o.colour, "colored"] + p["noun"]
    return article + p["size"] + p["colour"] + p["noun"]


def _object_words(o: _Obj, side: int, rng) -> list[str]:
    """"a small blue square": how a G-Ref sentence mentions a non-target object."""
    size = "small" if o.d < 0.23 * side else "big" if o.d > 0.34 * side else None
    return [str(rng.choice(["a", "the"]))] + ([size] if size and rng.random() < 0.6 else []) + [o.colour] + _noun(o.shape, rng).split()


def _relation_words(t: _Obj, o: _Obj, rng) -> list[str]:
    """Where t is relative to o ("to the left of", "above", "next to")."""
    if rng.random() < 0.3:
        return str(rng.choice(["next to", "near", "beside", "close to"])).split()
    dx, dy = t.cx - o.cx, t.cy - o.cy
    if abs(dx) >= abs(dy):
        return "to the left of".split() if dx < 0 else "to the right of".split()
    return ["above"] if dy < 0 else ["below"]


def _gref_sentence(descs: list[_Desc], objs: list[_Obj], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
    """Longer, relational: "the red circle which sits to the left of a small blue square"."""
    target = objs[t]
    d = _pick(descs, [3.0 if d.shape and d.colour else 1.0 for d in descs], rng)
    base = _phrase(d, target, rng, "the" if rng.random() < 0.75 else "a")
    dist = sorted((((o.cx - target.cx) ** 2 + (o.cy - target.cy) ** 2, i) for i, o in enumerate(objs) if i != t))
    near = objs[dist[0][1]]
    rel = _relation_words(target, near, rng) + _object_words(near, side, rng)
    if rng.random() < cfg.gref_long_prob and len(dist) >= 2:
        far = objs[dist[-1][1]]
        return _an(base + ["that", "is", "placed"] + rel + "and a bit farther away from".split()
                + _object_words(far, side, rng) + "in this picture with a plain background behind it".split())
    template = int(rng.integers(4))
    if template == 0:
        return _an(base + rel)
    if template == 1:
        return _an(base + ["that", "is"] + rel)
    if template == 2:
        return _an(["there", "is"] + base + rel)
    return _an(base + ["which", "sits"] + rel)


def _an(words: list[str]) -> list[str]:
    """"a orange" -> "an orange"."""
    return [("an" if w == "a" and nxt[0] in "aeiou" else w) for w, nxt in zip(words, words[1:] + ["x"])]


def _raw(words: list[str], rng) -> str:
    """A `raw` form of a sentence: case and punctuation variety; `clean(raw)` gives the words back."""
    words = list(words)
    if rng.random() < 0.15:
        i = int(rng.integers(len(words)))
        words[i] = words[i].upper()
    if rng.random() < 0.05:
        words = [x.upper() for x in words]
    elif rng.random() < 0.5:
        words[0] = words[0][:1].upper() + words[0][1:]
    if len(words) > 2 and rng.random() < 0.2:
        i = int(rng.integers(1, len(words) - 1))
        words[i] += ","
    end = rng.random()
    return " ".join(words) + ("." if end < 0.35 else "!" if end < 0.38 else "")


# ---------------------------------------------------------------------------------- images


def _noise_tile(seed: int, sigma: float, side: int = 512):
    """A side x side RGB noise image stored as 128 + noise (uint8), cropped per image."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng([seed, 2]).normal(0, sigma, (side, side, 3))  # [side, side, 3]
    return Image.fromarray(np.clip(np.round(noise) + 128, 0, 255).astype(np.uint8))


def _render(objs: list[_Obj], w: int, h: int, cfg: SynthConfig, rng, noise) -> bytes:
    """JPEG bytes of a scene: muted linear-gradient background, objects in z order, light noise."""
    import numpy as np
    from PIL import Image, ImageChops, ImageDraw

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


@dataclass(frozen=True)
class _Style:
    group_only: bool  # targets only objects of the scene's group (RefCOCO's people/objects images)
    location: bool  # descriptions may use location words
    sentence: Callable  # (descriptions, objects, target, shorter side, cfg, rng) -> words
    counts: str  # the SynthConfig field with P(1, 2, 3 sentences per ref)


STYLES = {  # dataset -> how its refs are chosen and phrased
    "refcoco": _Style(True, True, _refcoco_sentence, "sentences_per_ref"),
    "refcoco+": _Style(True, False, _refcocoplus_sentence, "sentences_per_ref"),
    "refcocog": _Style(False, True, _gref_sentence, "gref_sentences_per_ref"),
}


def _make_image(args) -> dict:
    """Everything about image i (scene, JPEG written to disk, sentences per dataset) from its own rng."""
    import numpy as np

    seed, i, group, path, cfg = args
    rng = np.random.default_rng([seed, 1, i])
    w, h = int(rng.integers(cfg.width[0], cfg.width[1] + 1)), int(rng.integers(cfg.height[0], cfg.height[1] + 1))
    for _ in range(1000):
        objs = _compose(group, cfg, rng)
        if not _place(objs, w, h, cfg, rng):
            continue
        every = {j: _descriptions(objs, j, w, h, cfg, True) for j in range(len(objs))}
        usable, pools = {}, {}
        for ds, style in STYLES.items():
            usable[ds] = {j: [d for d in every[j] if style.location or d.rel is None or d.rel in SIZE_WORDS]
                          for j in every if not style.group_only or objs[j].shape in SHAPES_OF[group]}
            pools[ds] = [j for j, descs in usable[ds].items() if descs]
        if all(len(p) >= cfg.refs_per_image[0] for p in pools.values()):
            break
    else:
        raise RuntimeError(f"no scene of image {i} satisfies the synth config {cfg}")
    for o in objs:
        _polygons(o, w, h, rng, cfg)
    _write_bytes(path, _render(objs, w, h, cfg, rng, _noise(seed, cfg.noise_sigma, max(512, cfg.width[1], cfg.height[1]))))

    side = min(w, h)
    refs = {}
    for ds, style in STYLES.items():
        pool = pools[ds]
        k = min(len(pool), int(rng.integers(cfg.refs_per_image[0], cfg.refs_per_image[1] + 1)))
        refs[ds] = []
        for t in sorted(int(j) for j in rng.choice(pool, size=k, replace=False)):  # uniform among the describable
            sents = []
            for _ in range(int(rng.choice([1, 2, 3], p=getattr(cfg, style.counts)))):
                raw = _raw(style.sentence(usable[ds][t], objs, t, side, cfg, rng), rng)
                sents.append((raw, clean(raw)))
            refs[ds].append((t, sents))
    return {"width": w, "height": h, "objects": [(o.shape, o.polys) for o in objs], "refs": refs}


_NOISE: dict = {}


def _noise(seed: int, sigma: float, side: int):
    key = (seed, sigma, side)
    if key not in _NOISE:
        _NOISE.clear()
        _NOISE[key] = _noise_tile(seed, sigma, side)
    return _NOISE[key]


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:  # many small files: plain writes (the refs pickles, written last, commit the set)
        f.write(data)


# ---------------------------------------------------------------------------------- the dataset


def _split_counts(n: int, fractions) -> list[int]:
    return [max(1, round(f * n)) for f in fractions]


def _splits(n: int, groups: list[str], cfg: SynthConfig, rng) -> dict[str, list[str]]:
    """Image-disjoint split names per partition (unc, umd, google), index-aligned with the images."""
    n_val, n_a, n_b = _split_counts(n, cfg.unc_fractions)
    unc = ["train"] * n
    for grp, name, count in ((GROUPS[0], "testA", n_a), (GROUPS[1], "testB", n_b)):
        for i in rng.permutation([i for i in range(n) if groups[i] == grp])[:count]:
            unc[i] = name
    for i in rng.permutation([i for i in range(n) if unc[i] == "train"])[:n_val]:
        unc[i] = "val"
    umd, google = ["train"] * n, ["train"] * n
    order = rng.permutation(n)
    n_val, n_test = _split_counts(n, cfg.umd_fractions)
    for i in order[:n_val]:
        umd[i] = "val"
    for i in order[n_val:n_val + n_test]:
        umd[i] = "test"
    for i in rng.permutation(n)[:_split_counts(n, [cfg.google_val_fraction])[0]]:
        google[i] = "val"
    return {"unc": unc, "umd": umd, "google": google}


PARTITIONS = [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google")]


def _check_out(out: Path) -> None:
    """Refuse to write over REFER/COCO files this command did not write (e.g. real RefCOCO)."""
    if (out / "SYNTH.json").exists():
        return
    ours = [out / ds / f"refs({sb}).p" for ds, sb in PARTITIONS] + [out / ds / "instances.json" for ds, _ in PARTITIONS]
    found = [p for p in ours if p.exists()] + sorted(p for ds, _ in PARTITIONS for p in (out / ds / "data").glob("*.parquet"))
    img_dir = out / "images" / "train2014"
    if found or (img_dir.is_dir() and any(img_dir.iterdir())):
        raise RefbenchError(
            f"{out} already holds REFER/COCO files not written by `refbench synth` ({found[0] if found else img_dir})",
            hint="choose another --out; synth only overwrites its own output (marked by SYNTH.json)",
        )


def identity(images: int, seed: int, cfg: SynthConfig = SynthConfig()) -> dict:
    """What SYNTH.json records of a dataset (JSON types): equal identities, byte-identical datasets."""
    return {"seed": seed, "images": images, "config": json.loads(json.dumps(asdict(cfg)))}


def written_identity(out: Path) -> dict | None:
    """The identity of the synthetic dataset in OUT (None: no SYNTH.json there), complete or not."""
    marker = Path(out) / "SYNTH.json"
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text())
    return {k: made.get(k) for k in ("seed", "images", "config")}


def is_complete(out: Path) -> bool:
    """Whether `generate` finished writing OUT (the last refs pickle it writes is there)."""
    ds, sb = PARTITIONS[-1]
    return (Path(out) / ds / f"refs({sb}).p").is_file()


def generate(out: Path, images: int, seed: int, cfg: SynthConfig = SynthConfig(), workers: int | None = None,
             parquet: bool = False) -> dict:
    """Write the dataset; returns the counts summary. `workers` processes render the images.

    `parquet`: also write each dataset as a Hugging Face parquet mirror snapshot (refbench.refer_hf:
    OUT/<dataset>/README.md + data/*.parquet, the partitions the mirrors hold), from the refs
    pickles and instances.json just written: same refs, same ids.
    """
    import numpy as np
    from pycocotools import mask as mask_utils

    if images < 20:
        raise RefbenchError(f"--images {images} is too small: the splits need at least 20 images")
    out = Path(out)
    _check_out(out)
    img_dir = out / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "SYNTH.json", {"generator": "refbench synth", "refbench_version": __version__,
                                           **identity(images, seed, cfg)})
    for stale in img_dir.glob("COCO_train2014_*.jpg"):  # our previous output (SYNTH.json marks the folder)
        stale.unlink()
    for ds in ("refcoco", "refcoco+", "refcocog"):  # a parquet snapshot of a previous run
        for stale in [*(out / ds / "data").glob("*.parquet"), out / ds / "README.md"]:
            stale.unlink(missing_ok=True)

    rng = np.random.default_rng([seed, 0])
    image_ids = [int(x) + 1 for x in rng.choice(581_929, size=images, replace=False)]
    ann_ids = iter(int(x) + 1 for x in rng.choice(2_300_000, size=images * cfg.objects[1], replace=False))
    groups = [GROUPS[int(g)] for g in rng.permutation(np.arange(images) % 2)]
    splits = _splits(images, groups, cfg, rng)
    file_names = [f"COCO_train2014_{iid:012d}.jpg" for iid in image_ids]
    tasks = [(seed, i, groups[i], img_dir / file_names[i], cfg) for i in range(images)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            scenes = pool.map(_make_image, tasks, chunksize=max(1, images // (8 * workers)))
    else:
        scenes = [_make_image(t) for t in tasks]

    coco_images, annotations, ann_of = [], [], []
    for i, sc in enumerate(scenes):
        coco_images.append({"license": 1, "file_name": file_names[i], "coco_url": "", "height": sc["height"],
                            "width": sc["width"], "date_captured": "", "flickr_url": "", "id": image_ids[i]})
        ids = []
        for shape, polys in sc["objects"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, sc["height"], sc["width"]))
            xs, ys = [v for p in polys for v in p[0::2]], [v for p in polys for v in p[1::2]]
            ann_id = next(ann_ids)
            annotations.append({
                "segmentation": polys, "area": float(mask_utils.area(rle)), "iscrowd": 0, "image_id": image_ids[i],
                "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                "category_id": CATEGORY_ID[shape], "id": ann_id,
            })
            ids.append(ann_id)
        ann_of.append(ids)
    instances = {
        "info": {"description": "refbench synthetic REFER data", "version": __version__, "seed": seed},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": coco_images, "annotations": annotations,
        "categories": [{"supercategory": g, "id": cid, "name": name} for cid, name, g in CATEGORIES],
    }
    blob = json.dumps(instances, separators=(",", ":")).encode()
    for ds in ("refcoco", "refcoco+", "refcocog"):
        atomic_write_bytes(out / ds / "instances.json", blob)

    summary = {"out": str(out), "images": images, "seed": seed, "datasets": {}}
    for ds in ("refcoco", "refcoco+", "refcocog"):
        refs = []
        sent_id = 0
        for i, sc in enumerate(scenes):
            for t, sents in sc["refs"][ds]:
                ann_id = ann_of[i][t]
                sentences = []
                for raw, sent in sents:
                    sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent})
                    sent_id += 1
                refs.append({
                    "sent_ids": [s["sent_id"] for s in sentences], "file_name": f"{file_names[i][:-4]}_{ann_id}.jpg",
                    "ann_id": ann_id, "ref_id": len(refs), "image_id": image_ids[i], "split": None,
                    "sentences": sentences, "category_id": CATEGORY_ID[sc["objects"][t][0]],
                })
        index = {iid: i for i, iid in enumerate(image_ids)}
        for sb in [sb for d, sb in PARTITIONS if d == ds]:
            part = [dict(r, split=splits[sb][index[r["image_id"]]]) for r in refs]
            atomic_write_bytes(out / ds / f"refs({sb}).p", pickle.dumps(part, protocol=2))
            summary["datasets"][f"{ds}_{sb}"] = _counts(part)
    if parquet:
        from refbench import refer_hf

        summary["parquet"] = {ds: [str(p) for p in refer_hf.convert_refer(out, ds)] for ds in refer_hf.MIRRORS}
    return summary


def _counts(refs: list[dict]) -> dict:
    from refbench.refer import split_order

    per: dict[str, dict] = {}
    images: dict[str, set] = {}
    for r in refs:
        c = per.setdefault(r["split"], {"images": 0, "refs": 0, "sentences": 0})
        c["refs"] += 1
        c["sentences"] += len(r["sentences"])
        images.setdefault(r["split"], set()).add(r["image_id"])
    for s, c in per.items():
        c["images"] = len(images[s])
    return dict(sorted(per.items(), key=lambda kv: split_order(kv[0])))


def main(out: Path, images: int | None, seed: int, parquet: bool = False) -> dict:
    """`refbench synth`: write the dataset, print a summary table, return the summary dict."""
    import time

    from rich.console import Console
    from rich.table import Table

    from refbench.fsutil import check_output_folder

    check_output_folder(Path(out), "--out")  # before any work
    n = DEFAULT_IMAGES if images is None else images
    console = Console()
    t0 = time.perf_counter()
    with console.status(f"writing {n} synthetic images and their REFER annotations to {out} ..."):
        summary = generate(Path(out), n, seed, parquet=parquet)
    seconds = time.perf_counter() - t0
    table = Table(title=f"refbench synth -> {out}: {n} images, seed {seed}")
    for col in ("dataset", "split", "images", "refs", "sentences"):
        table.add_column(col, justify="left" if col in ("dataset", "split") else "right")
    for name, per in summary["datasets"].items():
        for split, c in per.items():
            table.add_row(name, split, str(c["images"]), str(c["refs"]), str(c["sentences"]))
    console.print(table)
    console.print(f"{n} synthetic images and 4 REFER annotation sets written in {seconds:.1f} s")
    if parquet:
        console.print(f"parquet mirror snapshots (jxu124 layout): {', '.join(str(Path(out) / ds) for ds in summary['parquet'])} "
                      f"(`refbench prepare --all --source hf --data {out}`)")
    return summary
