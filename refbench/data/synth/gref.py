"""The synthetic gRefCOCO of `refbench synth`: multi-target and no-target sentences on the same scenes.

`refbench synth` writes `OUT/grefcoco/grefs(unc).json` and `OUT/grefcoco/instances.json` (the
same annotations as the RefCOCO folders) in exactly the raw format `refbench.data.sources.grefer` reads, from
the very scenes of the RefCOCO sets, so nothing about those sets changes. Per image, 2 or 3 refs,
each of one kind (`KIND_P`: about 60% single, 30% multi-target, 10% no-target of the refs, and so
of the sentences, every kind drawing its sentence count from `SynthConfig.sentences_per_ref`):

- single: one of the image's RefCOCO refs, its sentences as written there;
- multi-target: a set of >= 2 objects that a description picks out exactly, phrased to say so:
  all objects of one colour, one shape or both ("both red squares", "every circle", "all the
  blue shapes"), the two objects on one side of the third with a margin ("the two shapes on the
  left"), or every object ("all three shapes");
- no-target: a colour or a shape absent from the image ("the purple star", "the ring"); its
  `ann_id` is `[-1]`, its `category_id` -1, its `no_target` true.

Splits are the unc image splits (train/val/testA/testB). Everything comes from the image's own
generator `default_rng([seed, 2, i])`, so the dataset is as deterministic as the rest of synth.
"""

from __future__ import annotations

from refbench.data.synth.language import SHAPE_WORDS, clean, raw_expression
from refbench.data.synth.scene import COLOUR_NAMES, SHAPES_OF, SceneObject, SynthConfig

KIND_P = (0.6, 0.3, 0.1)  # P(single, multi-target, no-target) per ref
REFS_PER_IMAGE = (2, 3)  # inclusive
_NUMBER = {2: "two", 3: "three", 4: "four", 5: "five"}
_SIDES = {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}  # axis, from the high end


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _noun(shape: str, rng) -> str:
    nouns = SHAPE_WORDS[shape]
    return nouns[0] if len(nouns) == 1 or rng.random() < 0.75 else nouns[1]


def _set_phrase(objs: list[SceneObject], key: tuple, members: list[int], rng) -> list[str]:
    """Words for `members`, exactly the objects matching `key` = (colour or None, shape or None)."""
    colour, shape = key
    n = len(members)
    noun = _plural(_noun(shape, rng)) if shape else str(rng.choice(["shapes", "objects"]))
    words = ([colour] if colour else []) + noun.split()
    if n == 2:
        lead = [["both"], ["the", "two"], ["both", "the"]][int(rng.integers(3))]
    else:
        lead = [["all", "the"], ["all"], ["the", _NUMBER.get(n, "many")]][int(rng.integers(3))]
    if shape and rng.random() < 0.3:  # "every circle", "each red square": singular noun
        return [str(rng.choice(["every", "each"]))] + ([colour] if colour else []) + _noun(shape, rng).split()
    return lead + words


def multi_candidates(objs: list[SceneObject], w: int, h: int, cfg: SynthConfig) -> list[tuple[list[int], str, object]]:
    """Every object set of >= 2 that a description picks out exactly: (members, kind, key)."""
    out, seen = [], set()
    for key in [(o.colour, None) for o in objs] + [(None, o.shape) for o in objs] + [(o.colour, o.shape) for o in objs]:
        members = [j for j, o in enumerate(objs) if (key[0] in (None, o.colour)) and (key[1] in (None, o.shape))]
        if len(members) >= 2 and (tuple(members), key) not in seen:
            seen.add((tuple(members), key))
            out.append((members, "attr", key))
    if len(objs) >= 3:
        for side, (axis, high) in _SIDES.items():
            vals = [(o.cx, o.cy)[axis] for o in objs]
            order = sorted(range(len(objs)), key=lambda j: -vals[j] if high else vals[j])
            gap = abs(vals[order[2]] - vals[order[1]])
            if gap >= cfg.location_margin * (w, h)[axis]:
                out.append((sorted(order[:2]), "side", side))
    out.append((list(range(len(objs))), "all", None))
    return out


def _multi_sentence(objs: list[SceneObject], cand, rng) -> list[str]:
    members, kind, key = cand
    if kind == "attr":
        return _set_phrase(objs, key, members, rng)
    if kind == "side":
        noun = str(rng.choice(["shapes", "objects"]))
        return (["the", "two", noun, "on", "the", key] if rng.random() < 0.5 else ["the", "two", key, noun]) \
            if key in ("left", "right") else (["the", "two", noun, "at", "the", key] if rng.random() < 0.5
                                               else ["the", "two", key, noun])
    n = len(members)
    return [["all", "shapes"], ["every", "shape"], ["all", _NUMBER.get(n, "the"), "shapes"], ["all", "the", "objects"]][int(rng.integers(4))]


def _absent_sentence(objs: list[SceneObject], rng) -> list[str] | None:
    """Words naming a colour or a shape that no object of the image has (None if none is absent)."""
    colours = [c for c in COLOUR_NAMES if c not in {o.colour for o in objs}]
    shapes = [s for grp in SHAPES_OF.values() for s in grp if s not in {o.shape for o in objs}]
    if colours and (not shapes or rng.random() < 0.5):
        colour = str(rng.choice(colours))
        present = sorted({o.shape for o in objs})
        tail = _noun(str(rng.choice(present)), rng).split() if rng.random() < 0.6 else [str(rng.choice(["shape", "one", "object"]))]
        return ["the", colour] + tail
    if shapes:
        words = _noun(str(rng.choice(shapes)), rng).split()
        if rng.random() < 0.4:
            words = [str(rng.choice(sorted({o.colour for o in objs})))] + words
        return ["the"] + words
    return None


def _sentences(make, cfg: SynthConfig, rng) -> list[tuple[str, str]]:
    """1-3 distinct sentences (raw, clean) from `make()`, as many as `sentences_per_ref` draws."""
    want = int(rng.choice([1, 2, 3], p=list(cfg.sentences_per_ref)))
    out: list[tuple[str, str]] = []
    for _ in range(4 * want):
        words = make()
        if words is None:
            break
        raw = raw_expression(words, rng)
        if clean(raw) not in {s for _, s in out}:
            out.append((raw, clean(raw)))
        if len(out) == want:
            break
    return out


def image_refs(objs: list[SceneObject], single: list[tuple[int, list]], w: int, h: int, cfg: SynthConfig,
               rng) -> list[tuple[list[int], list[tuple[str, str]]]]:
    """The image's gRefCOCO refs: (target object indices, [] for none; [(raw, sent)]) each.

    `single` are the image's RefCOCO refs (target, sentences); single-target refs are drawn from
    them, without repeats (a draw of one when none is left becomes a multi-target ref).
    """
    singles = list(single)
    multis = multi_candidates(objs, w, h, cfg)
    out: list[tuple[list[int], list]] = []
    used: set[tuple[int, ...]] = set()
    for _ in range(int(rng.integers(REFS_PER_IMAGE[0], REFS_PER_IMAGE[1] + 1))):
        kind = int(rng.choice(3, p=list(KIND_P)))
        if kind == 0 and singles:
            t, sents = singles.pop(int(rng.integers(len(singles))))
            out.append(([int(t)], list(sents)))
            continue
        if kind == 2:
            sents = _sentences(lambda: _absent_sentence(objs, rng), cfg, rng)
            if sents:
                out.append(([], sents))
                continue
        free = [c for c in multis if tuple(c[0]) not in used]
        if not free:
            continue
        cand = free[int(rng.integers(len(free)))]
        used.add(tuple(cand[0]))
        same = [c for c in multis if c[0] == cand[0]]  # every description of the same set
        out.append((list(cand[0]), _sentences(lambda: _multi_sentence(objs, same[int(rng.integers(len(same)))], rng), cfg, rng)))
    return out
