"""Captions and questions about a scene: several objects, their sizes, counts and relations.

Relations are strict so that every sentence is true of the pixels: A is "left of" B when A's
box ends where B's begins or before (likewise right of, above, below). An object is named
with "the" only when the words pick it out: its class alone when the class is unique in the
scene, or its size and class when two objects share the class but not the size; others are
only counted. Yes/no answers are balanced by drawing the wanted answer first and skipping
the question when the scene cannot give it.
"""

from __future__ import annotations

import numpy as np

from vlp_cli.readers.easyvqa import POSITIONS, make_caption
from vlp_cli.scenes.layout import CLASSES, COLORS, SHAPES, Scene, SceneObject

RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MIN_CAPTIONS, MAX_CAPTIONS = 3, 5
TRIES = 30  # random draws to find a question of the wanted form


def holds(rel: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a rel b` is true of the two boxes."""
    if rel == "left of":
        return a.box[2] <= b.box[0]
    if rel == "right of":
        return a.box[0] >= b.box[2]
    if rel == "above":
        return a.box[3] <= b.box[1]
    return a.box[1] >= b.box[3]


def position(obj: SceneObject, scene: Scene) -> str:
    """The 3x3 cell of the box centre: "top left", "center", ..."""
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    col, row = min(int(3 * cx / scene.width), 2), min(int(3 * cy / scene.height), 2)
    return POSITIONS[3 * row + col]


def indefinite(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.name}"


def definite(obj: SceneObject, scene: Scene, rng: np.random.Generator) -> str | None:
    """ "the red circle" / "the small red circle", or None when the words fit two objects."""
    same = [o for o in scene.objects if o.name == obj.name]
    if len(same) == 1:
        return f"the {obj.size} {obj.name}" if rng.random() < 0.3 else f"the {obj.name}"
    if sum(o.size == obj.size for o in same) == 1:
        return f"the {obj.size} {obj.name}"
    return None


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(scene: Scene) -> dict[str, list[SceneObject]]:
    groups: dict[str, list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.name, []).append(obj)
    return groups


def _group_phrase(objs: list[SceneObject]) -> str:
    if len(objs) == 1:
        return indefinite(objs[0])
    return f"{NUMBERS[len(objs)]} {objs[0].color} {objs[0].shape}s"


# -- captions ---------------------------------------------------------------------------------


def _inventory(scene: Scene, rng: np.random.Generator) -> str:
    groups = list(_groups(scene).values())
    order = rng.permutation(len(groups))
    return _join([_group_phrase(groups[i]) for i in order])


def _shape_counts(scene: Scene, rng: np.random.Generator) -> str:
    counts = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    parts = [f"a {s}" if n == 1 else f"{NUMBERS[n]} {s}s"
             for s, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n]
    text = _join(parts)
    return f"{NUMBERS[len(scene.objects)]} shapes: {text}" if rng.random() < 0.5 else text


def _positions(scene: Scene, rng: np.random.Generator) -> str:
    k = min(len(scene.objects), int(rng.integers(2, 4)))
    picked = rng.choice(len(scene.objects), size=k, replace=False)
    return _join([make_caption(o.color, o.shape, o.size, position(o, scene))
                  for o in (scene.objects[int(i)] for i in picked)])


def _relations(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Pair relations ("a small red circle left of a large blue rectangle") and group ones
    ("two green triangles above a large gray rectangle"), shuffled."""
    out = []
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    for i in rng.permutation(len(pairs))[:6]:
        a, b = pairs[int(i)]
        rels = [r for r in RELATIONS if holds(r, a, b)]
        if rels and a.name != b.name:
            out.append(f"{indefinite(a)} {rels[int(rng.integers(len(rels)))]} {indefinite(b)}")
    for objs in _groups(scene).values():
        if len(objs) < 2:
            continue
        for b in scene.objects:
            rels = [r for r in RELATIONS if b.name != objs[0].name
                    and all(holds(r, a, b) for a in objs)]
            if rels:
                out.append(f"{_group_phrase(objs)} {rels[0]} {indefinite(b)}")
    return [out[int(i)] for i in rng.permutation(len(out))]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3 to 5 distinct references, each naming at least two objects: an inventory, up to two
    relations, shape counts, positions."""
    k = int(rng.integers(MIN_CAPTIONS, MAX_CAPTIONS + 1))
    found = [_inventory(scene, rng), *_relations(scene, rng)[:2], _shape_counts(scene, rng),
             _positions(scene, rng)]
    return list(dict.fromkeys(found))[:k]


# -- questions --------------------------------------------------------------------------------


def _count(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    kind = ("shape", "color", "class")[int(rng.integers(3))]
    if rng.random() < 0.2:  # sometimes something that is not there
        obj = SceneObject(str(rng.choice(COLORS)), str(rng.choice(SHAPES)), "", obj.box, "")
    if kind == "shape":
        n, what = sum(o.shape == obj.shape for o in scene.objects), f"{obj.shape}s"
    elif kind == "color":
        n, what = sum(o.color == obj.color for o in scene.objects), f"{obj.color} shapes"
    else:
        n, what = sum(o.name == obj.name for o in scene.objects), f"{obj.name}s"
    return f"how many {what} are there?", str(n)


def _exists(scene: Scene, rng: np.random.Generator, want: bool) -> tuple[str, str]:
    present = {o.name for o in scene.objects}
    if want:
        return f"is there a {sorted(present)[int(rng.integers(len(present)))]}?", "yes"
    # Mostly a near miss: a present shape in another colour, or a present colour in another
    # shape, so that the answer needs the region's class and not only the scene's gist.
    near = sorted({f"{c} {o.shape}" for o in scene.objects for c in COLORS}
                  | {f"{o.color} {s}" for o in scene.objects for s in SHAPES})
    pool = [x for x in (near if rng.random() < 0.8 else CLASSES) if x not in present]
    return f"is there a {pool[int(rng.integers(len(pool)))]}?", "no"


def _related(scene: Scene, rng: np.random.Generator, asks: str) -> tuple[str, str] | None:
    """ "what color is the shape left of the blue triangle?" / "what shape is above ...?" """
    for _ in range(TRIES):
        x = scene.objects[int(rng.integers(len(scene.objects)))]
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        hits = [o for o in scene.objects if o is not x and holds(rel, o, x)]
        ref = definite(x, scene, rng)
        if len(hits) == 1 and ref is not None:
            if asks == "color":
                return f"what color is the shape {rel} {ref}?", hits[0].color
            return f"what shape is {rel} {ref}?", hits[0].shape
    return None


def _attribute(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    """ "what color is the triangle?" / "what size is the red circle?" """
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if rng.random() < 0.5:
        if sum(o.shape == obj.shape for o in scene.objects) == 1:
            return f"what color is the {obj.shape}?", obj.color
        if sum(o.shape == obj.shape and o.size == obj.size for o in scene.objects) == 1:
            return f"what color is the {obj.size} {obj.shape}?", obj.color
        return None
    same = [o for o in scene.objects if o.name == obj.name]
    if len(same) == 1:  # the size is the answer: only the class may name it
        return f"what size is the {obj.name}?", obj.size
    return None


def _relation_yes_no(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    want = bool(rng.random() < 0.5)
    for _ in range(TRIES):
        i, j = rng.choice(len(scene.objects), size=2, replace=False)
        a, b = scene.objects[int(i)], scene.objects[int(j)]
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        ra, rb = definite(a, scene, rng), definite(b, scene, rng)
        if ra is None or rb is None or holds(rel, a, b) != want:
            continue
        return f"is {ra} {rel} {rb}?", "yes" if want else "no"
    return None


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs: counts, existence, colours and shapes by relation, sizes,
    relations yes/no; each form tried once or twice, duplicates dropped."""
    yes = bool(rng.random() < 0.5)  # one "is there" question of each answer
    found = [_count(scene, rng), _count(scene, rng), _exists(scene, rng, yes),
             _exists(scene, rng, not yes),
             _related(scene, rng, "color"), _related(scene, rng, "shape"),
             _attribute(scene, rng), _attribute(scene, rng), _relation_yes_no(scene, rng)]
    seen: dict[str, str] = {}
    for qa in found:
        if qa is not None and qa[0] not in seen:
            seen[qa[0]] = qa[1]
    return list(seen.items())
