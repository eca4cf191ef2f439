"""Scene layouts and pixels: easy-VQA shapes cut out by their coverage, pasted on a canvas.

A scene's objects are drawn one at a time: a class (colour x shape, uniform over the 24, so
every class appears), sometimes the class of an earlier object at another size (so that
referring to one needs its size or position), a size word and a side within that size's
band, a source image of that class from the scene's own split, and a free position whose
box covers at most `MAX_OVERLAP` of any earlier box or is covered by an earlier box at most
that much (some overlap, nothing hidden). Later objects are painted over earlier ones.

Each scene has its own random stream, `default_rng([seed, split, index])`: scene i is the
same whatever the number of scenes asked for, so a prefix of the set is a smaller set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp_cli.readers import easyvqa

SEED = 9
TRAIN_SCENES = 3000
TEST_SCENES = 600
CANVAS = 128  # pixels, square
MIN_OBJECTS, MAX_OBJECTS = 2, 6
# Side (sqrt of box area, pixels) of each size word: bands with gaps, so that the words are
# told apart by the pixels and not by a threshold inside a continuum.
SIZE_BANDS: dict[str, tuple[float, float]] = {"small": (12.0, 17.0), "medium": (21.0, 28.0),
                                              "large": (33.0, 42.0)}
# A scene gets one object that repeats an earlier object's class (at another size) this often.
REPEAT_PROB = 0.2
# At most this share of a box may be covered by another box (in either order).
MAX_OVERLAP = 0.3
PLACEMENT_TRIES = 60
# Source shapes: long thin rectangles would not fit a large size on the canvas, and shapes
# under this side blur when enlarged.
MAX_ASPECT = 2.2
MIN_SOURCE_SIDE = 12.0
SPLIT_INDEX = {"train": 0, "test": 1}

COLORS = easyvqa.EASYVQA_COLORS
SHAPES = easyvqa.EASYVQA_SHAPES
# The 24 object classes, colour-major: "red circle", "red rectangle", ... "gray triangle".
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class SceneObject:
    """One pasted shape: its class, attributes and box (x1, y1, x2, y2 pixels, x2/y2 exclusive)."""

    color: str
    shape: str
    size: str
    box: tuple[float, float, float, float]
    source: str  # the easy-VQA image key it was cut from

    @property
    def name(self) -> str:
        """The class name, e.g. "red circle" (the object tag)."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One canvas: its stable key (also its image key), split, background and objects."""

    key: str  # "scenes/train/00012.png"
    split: str
    index: int
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class _Source:
    key: str
    split: str
    color: str
    shape: str
    box: tuple[float, float, float, float]


def scene_key(split: str, index: int) -> str:
    return f"scenes/{split}/{index:05d}.png"


@functools.lru_cache(maxsize=2)
def source_pool(split: str) -> dict[str, tuple[_Source, ...]]:
    """The usable easy-VQA shapes of a split by class (pixel-derived, cached per process)."""
    pool: dict[str, list[_Source]] = {name: [] for name in CLASSES}
    for a in easyvqa.derive_annotations(split):
        w, h = a.box[2] - a.box[0], a.box[3] - a.box[1]
        if max(w, h) / min(w, h) <= MAX_ASPECT and np.sqrt(w * h) >= MIN_SOURCE_SIDE:
            pool[f"{a.color} {a.shape}"].append(_Source(a.key, split, a.color, a.shape, a.box))
    empty = [name for name, found in pool.items() if not found]
    if empty:
        raise ValueError(f"easy-VQA {split} has no usable shape of class {empty[0]!r}")
    return {name: tuple(found) for name, found in pool.items()}


def _overlap_ok(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            other_area = (other[2] - other[0]) * (other[3] - other[1])
            if inter > MAX_OVERLAP * min(area, other_area):
                return False
    return True


def make_scene(split: str, index: int, seed: int = SEED) -> Scene:
    """Scene `index` of a split, from its own random stream."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], index])
    pool = source_pool(split)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    classes = [CLASSES[int(i)] for i in rng.integers(0, len(CLASSES), size=n)]
    sizes = [list(SIZE_BANDS)[int(i)] for i in rng.integers(0, len(SIZE_BANDS), size=n)]
    if rng.random() < REPEAT_PROB:
        # One object takes an earlier one's class at another size: "the small red circle".
        j, i = sorted(rng.choice(n, size=2, replace=False).tolist())
        classes[i] = classes[j]
        sizes[i] = str(rng.choice([s for s in SIZE_BANDS if s != sizes[j]]))
    placed: list[np.ndarray] = []
    objects: list[SceneObject] = []
    for name, size in zip(classes, sizes):
        candidates = pool[name]
        src = candidates[int(rng.integers(len(candidates)))]
        lo, hi = SIZE_BANDS[size]
        side = float(rng.uniform(lo, hi))
        w0, h0 = src.box[2] - src.box[0], src.box[3] - src.box[1]
        scale = side / float(np.sqrt(w0 * h0))
        w, h = w0 * scale, h0 * scale
        for _ in range(PLACEMENT_TRIES):
            x, y = rng.uniform(0, CANVAS - w), rng.uniform(0, CANVAS - h)
            box = np.array([x, y, x + w, y + h])
            if _overlap_ok(box, placed):
                placed.append(box)
                objects.append(SceneObject(src.color, src.shape, size,
                                           tuple(round(float(v), 2) for v in box), src.key))
                break
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    return Scene(scene_key(split, index), split, index, CANVAS, CANVAS,
                 background, tuple(objects))  # type: ignore[arg-type]


def make_scenes(split: str, count: int, seed: int = SEED) -> list[Scene]:
    """The first `count` scenes of a split."""
    return [make_scene(split, i, seed) for i in range(count)]


@functools.lru_cache(maxsize=1)
def _data_root() -> Path:
    return easyvqa.data_root()


@functools.lru_cache(maxsize=8192)
def _cutout(source_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [h, w] float32 around the shape with a 1-pixel rim, the shape's box in it)."""
    with Image.open(_data_root() / source_key) as im:
        rgb = np.asarray(im.convert("RGB"))
    coverage, _, _ = easyvqa.shape_coverage(rgb)
    mask = coverage >= easyvqa.COVERAGE_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y1, y2 = max(rows[0] - 1, 0), min(rows[-1] + 2, rgb.shape[0])
    x1, x2 = max(cols[0] - 1, 0), min(cols[-1] + 2, rgb.shape[1])
    inner = np.array([cols[0] - x1, rows[0] - y1, cols[-1] + 1 - x1, rows[-1] + 1 - y1], float)
    return coverage[y1:y2, x1:x2].astype(np.float32), inner


def render(scene: Scene) -> np.ndarray:
    """The scene's pixels, uint8 [H, W, 3]: a lightly shaded background, shapes in order."""
    rng = np.random.default_rng([SEED, SPLIT_INDEX[scene.split], scene.index, 2])
    # A gentle linear shade (a few levels across the canvas): not a flat colour, and unlike
    # pixel noise it keeps the PNG small.
    gy, gx = np.mgrid[0:scene.height, 0:scene.width].astype(np.float32) / max(scene.width, 1)
    tilt = rng.uniform(-8, 8, size=(2, 3)).astype(np.float32)
    canvas = (np.asarray(scene.background, np.float32)[None, None]
              + gx[..., None] * tilt[0] + gy[..., None] * tilt[1])
    for obj in scene.objects:
        coverage, inner = _cutout(obj.source)
        bw, bh = obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]
        sx, sy = bw / (inner[2] - inner[0]), bh / (inner[3] - inner[1])
        # The cut-out (rim included) placed so that its shape box lands on the object's box.
        left, top = obj.box[0] - inner[0] * sx, obj.box[1] - inner[1] * sy
        x0, y0 = int(np.floor(left)), int(np.floor(top))
        out_w = int(np.ceil(left + coverage.shape[1] * sx)) - x0
        out_h = int(np.ceil(top + coverage.shape[0] * sy)) - y0
        alpha = np.asarray(Image.fromarray(coverage).resize(
            (out_w, out_h), Image.Resampling.BILINEAR), np.float32).clip(0, 1)
        cx1, cy1 = max(x0, 0), max(y0, 0)
        cx2, cy2 = min(x0 + out_w, scene.width), min(y0 + out_h, scene.height)
        a = alpha[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0, None]
        color = np.asarray(easyvqa.REFERENCE_RGB[obj.color], np.float32)
        region = canvas[cy1:cy2, cx1:cx2]
        canvas[cy1:cy2, cx1:cx2] = region * (1 - a) + color * a
    return canvas.round().clip(0, 255).astype(np.uint8)


def write_images(scenes: list[Scene], root: Path) -> None:
    """Render each scene to `root / scene.key` (PNG)."""
    for scene in scenes:
        path = root / scene.key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(scene)).save(path, optimize=False)
