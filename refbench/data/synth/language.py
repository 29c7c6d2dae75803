"""Synthetic referring expressions: which descriptions pick a target out, and how each dataset words them.

A description is a subset of {shape, colour} plus at most one relation (location or size) that
identifies the target among the scene's objects with a margin; `STYLES` says, per dataset, which
objects may be referred to and how a sentence is built (refcoco: short, location words common;
refcoco+: appearance only; refcocog: longer, relative to another object). `raw_expression` adds
case and punctuation variation; `clean` gives the `sent` form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from refbench.data.synth.scene import SceneObject, SynthConfig

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


# ---------------------------------------------------------------------------------- language


@dataclass(frozen=True)
class Description:
    shape: bool  # names the shape
    colour: bool  # names the colour
    rel: str | None  # a LOCATION_PHRASES or SIZE_WORDS key, or None
    n: int  # candidates matching shape/colour (the relation picks among them)


def _extreme(values: list[float], t: int, margin: float, largest: bool) -> bool:
    """Whether candidate t holds the smallest (largest) value, ahead of the next by `margin`."""
    v = values[t]
    others = [x for i, x in enumerate(values) if i != t]
    return all(x - v >= margin for x in others) if not largest else all(v - x >= margin for x in others)


def descriptions(objs: list[SceneObject], t: int, w: int, h: int, cfg: SynthConfig, location: bool) -> list[Description]:
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
                    out.append(Description(use_shape, use_colour, None, 1))
                    if location:  # redundant, but true in absolute terms: "the red circle on the left"
                        for rel, ok in (("left", target.cx < w / 3), ("right", target.cx > 2 * w / 3),
                                        ("top", target.cy < h / 3), ("bottom", target.cy > 2 * h / 3)):
                            if ok:
                                out.append(Description(use_shape, use_colour, rel, 1))
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
            out += [Description(use_shape, use_colour, r, len(cand)) for r in rels]
    return out


def _pick(items: list, weights: list[float], rng):
    p = np.asarray(weights, float)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _noun(shape: str, rng) -> str:
    words = SHAPE_WORDS[shape]
    return words[0] if len(words) == 1 or rng.random() < 0.75 else str(rng.choice(words[1:]))


def _parts(d: Description, o: SceneObject, rng) -> dict[str, list[str]]:
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


def _phrase(d: Description, o: SceneObject, rng, article: str | None) -> list[str]:
    """[article] [location prefix] [size] [colour] noun [location suffix]."""
    p = _parts(d, o, rng)
    return ([article] if article else []) + p["pre"] + p["size"] + p["colour"] + p["noun"] + p["post"]


def refcoco_sentence(descs: list[Description], objs: list[SceneObject], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
    """Short, location words preferred: "left red circle", "the square on the right", "bigger star"."""
    o = objs[t]
    weights = [(cfg.location_weight if d.rel in LOCATION_PHRASES else 1.5 if d.rel else 1.0)
               * (cfg.full_weight if d.shape and d.colour else 1.0) * (1.0 if d.shape else cfg.generic_weight)
               for d in descs]
    return _phrase(_pick(descs, weights, rng), o, rng, "the" if rng.random() < 0.35 else None)


def refcocoplus_sentence(descs: list[Description], objs: list[SceneObject], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
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


def _object_words(o: SceneObject, side: int, rng) -> list[str]:
    """"a small blue square": how a G-Ref sentence mentions a non-target object."""
    size = "small" if o.d < 0.23 * side else "big" if o.d > 0.34 * side else None
    return [str(rng.choice(["a", "the"]))] + ([size] if size and rng.random() < 0.6 else []) + [o.colour] + _noun(o.shape, rng).split()


def _relation_words(t: SceneObject, o: SceneObject, rng) -> list[str]:
    """Where t is relative to o ("to the left of", "above", "next to")."""
    if rng.random() < 0.3:
        return str(rng.choice(["next to", "near", "beside", "close to"])).split()
    dx, dy = t.cx - o.cx, t.cy - o.cy
    if abs(dx) >= abs(dy):
        return "to the left of".split() if dx < 0 else "to the right of".split()
    return ["above"] if dy < 0 else ["below"]


def gref_sentence(descs: list[Description], objs: list[SceneObject], t: int, side: int, cfg: SynthConfig, rng) -> list[str]:
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


def raw_expression(words: list[str], rng) -> str:
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


@dataclass(frozen=True)
class Style:
    group_only: bool  # targets only objects of the scene's group (RefCOCO's people/objects images)
    location: bool  # descriptions may use location words
    sentence: Callable  # (descriptions, objects, target, shorter side, cfg, rng) -> words
    counts: str  # the SynthConfig field with P(1, 2, 3 sentences per ref)


STYLES = {  # dataset -> how its refs are chosen and phrased
    "refcoco": Style(True, True, refcoco_sentence, "sentences_per_ref"),
    "refcoco+": Style(True, False, refcocoplus_sentence, "sentences_per_ref"),
    "refcocog": Style(False, True, gref_sentence, "gref_sentences_per_ref"),
}
