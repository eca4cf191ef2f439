"""Sentences about scenes for the other data sets' forms: compositional questions (GQA),
statements about two scenes (NLVR2), hypotheses (SNLI-VE) and referring expressions (RefCOCO).

Every sentence is true or false of the pixels by the same strict relations as the captions
(`language.holds`). Wherever the answer is yes/no or true/false, the wanted answer is drawn
first and the sentence is kept only when the scene gives it, so that every form appears with
both answers across the set and the words alone cannot tell which.
"""

from __future__ import annotations

import numpy as np

from vlp_cli.scenes.language import (NUMBERS, RELATIONS, TRIES, _related, _relation_yes_no,
                                     holds)
from vlp_cli.scenes.layout import CLASSES, COLORS, SHAPES, Scene, SceneObject

SIZE_ORDER = {"small": 0, "medium": 1, "large": 2}
# What a picture of flat shapes cannot show: SNLI-VE's neutral hypotheses.
HIDDEN = ("is made of wood", "is heavy", "was drawn first", "belongs to a child",
          "is warm to the touch", "is made of paper", "was cut out by hand")


def _pick(seq: list, rng: np.random.Generator):
    return seq[int(rng.integers(len(seq)))]


def _unique(scene: Scene) -> list[SceneObject]:
    """The objects whose class no other object of the scene shares: "the red circle" names them."""
    return [o for o in scene.objects if sum(p.name == o.name for p in scene.objects) == 1]


def _absent(scene: Scene, rng: np.random.Generator) -> str:
    """A class not in the scene, mostly a near miss (a present shape in another colour or a
    present colour in another shape)."""
    present = {o.name for o in scene.objects}
    near = sorted({f"{c} {o.shape}" for o in scene.objects for c in COLORS}
                  | {f"{o.color} {s}" for o in scene.objects for s in SHAPES})
    pool = [x for x in (near if rng.random() < 0.8 else CLASSES) if x not in present]
    return _pick(pool, rng)


# -- GQA: compositional questions with their structural / semantic / detailed types ----------


def _both(scene: Scene, rng: np.random.Generator, want: bool) -> tuple[str, str] | None:
    present = sorted({o.name for o in scene.objects})
    if len(present) < 2:
        return None
    a = _pick(present, rng)
    b = _pick([x for x in present if x != a], rng) if want else _absent(scene, rng)
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    return f"is there both a {first} and a {second}?", "yes" if want else "no"


def _larger(scene: Scene, rng: np.random.Generator, want: bool) -> tuple[str, str] | None:
    objs = _unique(scene)
    for _ in range(TRIES):
        if len(objs) < 2:
            return None
        a, b = (objs[int(i)] for i in rng.choice(len(objs), size=2, replace=False))
        if a.size != b.size and (SIZE_ORDER[a.size] > SIZE_ORDER[b.size]) == want:
            return f"is the {a.name} larger than the {b.name}?", "yes" if want else "no"
    return None


def _side(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    objs = _unique(scene)
    for _ in range(TRIES):
        if len(objs) < 2:
            return None
        a, b = (objs[int(i)] for i in rng.choice(len(objs), size=2, replace=False))
        side = "left" if holds("left of", a, b) else "right" if holds("right of", a, b) else None
        if side is not None:
            return f"is the {a.name} to the left or to the right of the {b.name}?", side
    return None


def gqa_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, dict]]:
    """(question, answer, GQA's `types`) per scene: query (an attribute through a relation),
    verify (a relation), logical (both present), compare (sizes), choose (left or right)."""
    want = [bool(rng.random() < 0.5) for _ in range(3)]
    found = [(_related(scene, rng, "color"), ("query", "rel", "relS")),
             (_related(scene, rng, "shape"), ("query", "rel", "relO")),
             (_relation_yes_no(scene, rng), ("verify", "rel", "relVerify")),
             (_both(scene, rng, want[0]), ("logical", "obj", "existAnd")),
             (_larger(scene, rng, want[1]), ("compare", "attr", "compareSize")),
             (_side(scene, rng), ("choose", "rel", "relChooser"))]
    seen: dict[str, tuple[str, dict]] = {}
    for qa, (structural, semantic, detailed) in found:
        if qa is not None and qa[0] not in seen:
            seen[qa[0]] = (qa[1], {"structural": structural, "semantic": semantic,
                                   "detailed": detailed})
    return [(q, a, t) for q, (a, t) in seen.items()]


# -- NLVR2: a statement about two scenes ------------------------------------------------------


def _count(scene: Scene, pred) -> int:
    return sum(bool(pred(o)) for o in scene.objects)


def _statement(left: Scene, right: Scene, rng: np.random.Generator,
               form: int) -> tuple[str, bool]:
    """A statement of one form about the pair, with random parts, and whether it is true."""
    both = [*left.objects, *right.objects]
    side, scene = (("left", left), ("right", right))[int(rng.integers(2))]
    obj = _pick(both, rng)
    name = obj.name if rng.random() < 0.6 else _absent(_pick([left, right], rng), rng)
    if form == 0:
        n = int(rng.integers(1, 4))
        shape = obj.shape
        return (f"the {side} image contains exactly {NUMBERS[n]} {shape}"
                f"{'s' if n > 1 else ''}", _count(scene, lambda o: o.shape == shape) == n)
    if form == 1:
        return (f"the {side} image contains a {name}",
                _count(scene, lambda o: o.name == name) > 0)
    if form == 2:
        color = obj.color
        return (f"both images contain a {color} shape",
                all(_count(s, lambda o: o.color == color) > 0 for s in (left, right)))
    if form == 3:
        has = [_count(s, lambda o: o.name == name) > 0 for s in (left, right)]
        return f"exactly one image contains a {name}", has[0] != has[1]
    if form == 4:
        other = right if side == "left" else left
        return (f"the {side} image has more shapes than the {'right' if side == 'left' else 'left'}"
                " image", len(scene.objects) > len(other.objects))
    x = _pick(list(scene.objects), rng)
    y = _pick([o for o in both if o.name != x.name] or both, rng)
    rel = _pick(list(RELATIONS), rng)
    true = any(holds(rel, a, b) for a in scene.objects for b in scene.objects
               if a.name == x.name and b.name == y.name)
    return f"in the {side} image a {x.name} is {rel} a {y.name}", true


FORMS = 6


def nlvr2_statement(left: Scene, right: Scene, rng: np.random.Generator,
                    want: bool) -> str | None:
    """A statement about the pair whose truth is `want`, or None. The form is drawn first and
    only its parts are drawn again, so each form is as often true as false."""
    for _ in range(3):
        form = int(rng.integers(FORMS))
        for _ in range(TRIES):
            text, true = _statement(left, right, rng, form)
            if true == want:
                return text
    return None


# -- SNLI-VE: hypotheses about a scene --------------------------------------------------------


def _visible(scene: Scene, rng: np.random.Generator, want: bool) -> str:
    if rng.random() < 0.5:
        name = _pick(scene.objects, rng).name if want else _absent(scene, rng)
        return f"there is a {name} in the picture"
    shape = _pick(list(SHAPES), rng)
    n = _count(scene, lambda o: o.shape == shape)
    if not want:
        n = _pick([k for k in range(1, 5) if k != n], rng)
    return f"the picture shows {NUMBERS[n]} {shape}s" if n != 1 else \
        f"the picture shows one {shape}"


def ve_hypotheses(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(hypothesis, label) x 4: entailment and contradiction about what the picture shows,
    neutral and contradiction about what it cannot show (a hidden property of an object that
    is there, or of one that is not). Each form is half right, so the words alone decide
    nothing: contradiction is half of the labels, entailment and neutral a quarter each."""
    present = _pick(scene.objects, rng).name
    return [(_visible(scene, rng, True), "entailment"),
            (_visible(scene, rng, False), "contradiction"),
            (f"the {present} {_pick(list(HIDDEN), rng)}", "neutral"),
            (f"the {_absent(scene, rng)} {_pick(list(HIDDEN), rng)}", "contradiction")]


# -- RefCOCO: an expression for one object among several --------------------------------------


def referring(scene: Scene, rng: np.random.Generator) -> list[tuple[int, str, bool]]:
    """(object index, expression, whether its class repeats in the scene) for each object that
    words can pick out: its class when unique, else its size, else a relation to an object of
    a unique class that no other object of its class has."""
    unique = _unique(scene)
    out = []
    for i, obj in enumerate(scene.objects):
        same = [o for o in scene.objects if o.name == obj.name and o is not obj]
        if not same:
            out.append((i, f"the {obj.name}", False))
            continue
        if all(o.size != obj.size for o in same) and rng.random() < 0.5:
            out.append((i, f"the {obj.size} {obj.name}", True))
            continue
        options = [(rel, y) for y in unique for rel in RELATIONS
                   if holds(rel, obj, y) and not any(holds(rel, o, y) for o in same)]
        if options:
            rel, y = options[int(rng.integers(len(options)))]
            out.append((i, f"the {obj.name} {rel} the {y.name}", True))
        elif all(o.size != obj.size for o in same):
            out.append((i, f"the {obj.size} {obj.name}", True))
    return out
