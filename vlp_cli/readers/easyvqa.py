"""Pixel-derived annotations for the easy-VQA images (pip package `easy-vqa==1.0`).

easy-VQA ships 4,000 train and 1,000 test 64x64 RGB images, each with exactly one coloured
shape (circle, rectangle or triangle) on a plain, light, randomly tinted background, plus
template questions with single-word answers. Nothing else is annotated, so everything the
pre-training chain needs (a box, an object tag and a caption per image) is derived here from
the pixels and then checked against whatever the questions' answers pin down.

How one image is read (`annotate_image`):

* background: the most frequent exact colour on the image border (the shape may touch the
  border, but never covers most of it), refined by the median of border pixels close to it;
* shape colour: the median of the pixels farthest from the background. Those are the fully
  covered interior pixels; the anti-aliased rim is a blend and would bias a mean;
* coverage: each pixel's position on the segment background -> shape colour (0 = background,
  1 = shape). Measuring along that segment instead of thresholding a raw distance keeps the
  mask right when the shape colour is close to the background colour;
* box: bounding box of pixels at least `COVERAGE_THRESHOLD` covered, x2/y2 exclusive;
* colour name: the nearest of `REFERENCE_RGB` (the exact values the generator paints with,
  read off the images: every one of the 5,000 images contains its reference value verbatim);
* shape: fill ratio of the mask within its box: rectangle ~1, circle ~pi/4, triangle ~1/2
  (see `_FILL_CIRCLE_MIN` / `_FILL_RECTANGLE_MIN` for the observed ranges);
* size: the box's geometric-mean side as a fraction of the image side, cut at the train
  terciles (`SIZE_THRESHOLDS`);
* position: 3x3 grid cell of the box centre.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from vlp_cli import VlpError

logger = logging.getLogger(__name__)

INSTALL_COMMAND = "pip install easy-vqa==1.0"
SPLITS = ("train", "test")

EASYVQA_COLORS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "teal",
    "brown",
    "black",
    "gray",
)
EASYVQA_SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

# Exact paint values, read off the data: in every image the second most frequent colour (after
# the background) is exactly one of these, and the eight counts add up to all 5,000 images.
REFERENCE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

# A pixel belongs to the shape when it is at least this much shape colour. The generator draws
# at a larger scale and downsamples with a filter wider than one output pixel, so a straight
# edge leaves a row at ~0.5 coverage (often 0.497 after rounding) and a faint row at ~0.125.
# 0.4 keeps the half-covered row, whose centre is where the true edge falls, and drops the
# faint halo; the box is then within half a pixel of the drawn geometry.
COVERAGE_THRESHOLD = 0.4
# Pixels whose distance from the background is at least this fraction of the largest distance
# are taken as the fully covered interior when estimating the shape colour.
_INTERIOR_FRACTION = 0.9
# Distances (max over channels, 0-255) at or below this are treated as background noise.
_NOISE_FLOOR = 2.0

# Fill ratio = share of the box's pixels in the (thresholded) mask. Observed on all 5,000
# images, grouped by the shape their questions state: rectangles 0.967-1.000 (below 1 only
# because anti-aliased corners are quarter covered), circles 0.763-0.847, triangles
# 0.506-0.688 (the highest are the smallest, 8 px wide). The cuts sit in the middle of the
# two gaps. A soft fill (summed coverage) separates worse: the half-covered rim inflates the
# box of a small rectangle relative to its area, pulling it down to ~0.83, among the circles.
_FILL_CIRCLE_MIN = 0.725
_FILL_RECTANGLE_MIN = 0.905

# Size measure: sqrt(box width * box height), i.e. the side of a square with the box's area,
# so a long thin rectangle counts as medium rather than large. The generator draws each box
# side from a continuous range (8 to 33 px on 64 px images, roughly uniform), so there are no
# natural classes: the cuts are the train-split terciles (16.88 and 23.0 px), nudged to fall
# between observed values so the three classes hold 33.5%, 33.5% and 33.1% of train. They are
# stated for 64 px images and scale with min(width, height) for other sizes.
SIZE_REFERENCE_SIDE = 64
SIZE_THRESHOLDS_PX: tuple[float, float] = (16.9, 23.2)
SIZE_THRESHOLDS: tuple[float, float] = (
    SIZE_THRESHOLDS_PX[0] / SIZE_REFERENCE_SIDE,
    SIZE_THRESHOLDS_PX[1] / SIZE_REFERENCE_SIDE,
)


class EasyVqaNotInstalledError(VlpError, ModuleNotFoundError):
    """The `easy_vqa` package is missing; both a `VlpError` and a `ModuleNotFoundError`."""


class PixelAnnotation(NamedTuple):
    """What `annotate_image` reads off one image (unpacks as a plain tuple)."""

    box: tuple[float, float, float, float]
    color: str
    shape: str
    size: str
    position: str


class ShapeMeasurements(NamedTuple):
    """The raw measurements behind `annotate_image`, for diagnostics and threshold tuning."""

    box: tuple[float, float, float, float]
    fill: float  # share of the box's pixels inside the mask
    side: float  # sqrt(box area) / min(image width, image height)
    shape_rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]
    color: str  # nearest reference colour name


@dataclass
class ShapeAnnotation:
    """One easy-VQA image with its pixel-derived box, attributes and caption."""

    image_id: int
    split: str
    key: str
    box: tuple[float, float, float, float]
    color: str
    shape: str
    size: str
    position: str
    caption: str
    width: int
    height: int


@dataclass
class Disagreement:
    """A derived value the questions contradict."""

    image_id: int
    field: str
    derived: str
    from_questions: str


@dataclass
class AgreementReport:
    """How the pixel-derived colours and shapes compare with what the questions determine.

    Attributes:
        images: Number of annotated images checked.
        color_determined: Images whose colour the questions determine (stated outright, or
            all other seven colours excluded).
        color_agree: Of those, images whose derived colour matches.
        shape_determined: Same for the shape.
        shape_agree: Same for the shape.
        color_stated: Of `color_determined`, images where an answer states the colour
            outright (the rest are fixed by excluding the other seven).
        shape_stated: Same for the shape (the rest: the other two shapes excluded).
        disagreements: Every contradiction: a determined value that differs, or a derived
            value that an answer excludes (`from_questions` is then "not <value>").
        questions: Questions read.
        unknown_questions: Questions matching no known template (or with an answer the
            template cannot take); they constrain nothing but are counted, not hidden.
        unknown_examples: Up to ten of those, verbatim.
        questions_without_image: Questions about image ids not among the annotations.
        conflicting_images: Images whose own questions contradict each other (for example two
            different colours stated); nothing is counted as determined for that field.
    """

    images: int = 0
    color_determined: int = 0
    color_agree: int = 0
    shape_determined: int = 0
    shape_agree: int = 0
    color_stated: int = 0
    shape_stated: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)
    questions: int = 0
    unknown_questions: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    questions_without_image: int = 0
    conflicting_images: int = 0

    def summary(self) -> str:
        """One line with the counts and agreement rates."""

        def rate(agree: int, total: int) -> str:
            return f"{100.0 * agree / total:.2f}%" if total else "n/a"

        return (
            f"{self.images} images; colour determined {self.color_determined}, agree "
            f"{self.color_agree} ({rate(self.color_agree, self.color_determined)}; "
            f"{self.color_stated} stated); shape determined {self.shape_determined}, agree "
            f"{self.shape_agree} ({rate(self.shape_agree, self.shape_determined)}; "
            f"{self.shape_stated} stated); "
            f"{len(self.disagreements)} disagreements; {self.questions} questions, "
            f"{self.unknown_questions} unknown, {self.questions_without_image} without image, "
            f"{self.conflicting_images} images with conflicting answers"
        )


def data_root() -> Path:
    """The installed easy-VQA data folder (holding train/ and test/).

    Raises:
        EasyVqaNotInstalledError: `easy_vqa` is not installed (message names the pip command).
    """
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise EasyVqaNotInstalledError(
            f"the easy-VQA data package 'easy_vqa' is not installed: run `{INSTALL_COMMAND}`"
        )
    root = Path(spec.origin).parent / "data"
    if not root.is_dir():
        raise EasyVqaNotInstalledError(
            f"{root} is missing from the installed easy_vqa package: run "
            f"`{INSTALL_COMMAND} --force-reinstall`"
        )
    return root


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise VlpError(f"unknown easy-VQA split {split!r}: expected one of {', '.join(SPLITS)}")


def load_questions(split: str) -> tuple[list[str], list[str], list[int]]:
    """A split's questions as (texts, answers, image_ids), like `easy_vqa.get_*_questions()`.

    Args:
        split: "train" or "test".
    """
    _check_split(split)
    path = data_root() / split / "questions.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [str(row[0]) for row in rows]
    answers = [str(row[1]) for row in rows]
    image_ids = [int(row[2]) for row in rows]
    return texts, answers, image_ids


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _background(rgb: np.ndarray) -> np.ndarray:
    """Background colour as float RGB: the border's dominant colour."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).astype(np.int64)
    codes = (border[:, 0] << 16) | (border[:, 1] << 8) | border[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    mode_code = int(values[np.argmax(counts)])
    mode = np.array([(mode_code >> 16) & 255, (mode_code >> 8) & 255, mode_code & 255])
    # A median over the pixels near the mode tolerates mild noise (a re-encoded image) that an
    # exact mode alone would split into many rare colours.
    near = np.abs(border - mode).max(axis=1) <= 8
    return np.median(border[near], axis=0).astype(np.float64)


def _size_class(side: float) -> str:
    if side < SIZE_THRESHOLDS[0]:
        return "small"
    if side < SIZE_THRESHOLDS[1]:
        return "medium"
    return "large"


def _position(box: tuple[float, float, float, float], width: int, height: int) -> str:
    cx = (box[0] + box[2]) / 2.0
    cy = (box[1] + box[3]) / 2.0
    col = min(int(3.0 * cx / width), 2)
    row = min(int(3.0 * cy / height), 2)
    return POSITIONS[3 * row + col]


def _fill_to_shape(fill: float) -> str:
    if fill >= _FILL_RECTANGLE_MIN:
        return "rectangle"
    if fill >= _FILL_CIRCLE_MIN:
        return "circle"
    return "triangle"


def shape_coverage(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How much of each pixel the single shape covers, and the two colours it blends.

    Args:
        rgb: (H, W, 3) uint8 image with one shape on a plain background.

    Returns:
        (coverage [H, W] float in 0..1, shape colour, background colour), colours as float RGB.
        `coverage >= COVERAGE_THRESHOLD` is the shape's mask; the coverage itself is the
        anti-aliased alpha to paste the shape elsewhere with.

    Raises:
        ValueError: The array is not (H, W, 3) or no shape stands out from the background.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    pixels = rgb.astype(np.float64)
    background = _background(rgb)
    offset = pixels - background
    distance = np.abs(offset).max(axis=2)
    peak = float(distance.max())
    if peak <= _NOISE_FLOOR:
        raise ValueError("no shape found: every pixel matches the background colour")
    interior = distance >= _INTERIOR_FRACTION * peak
    shape_rgb = np.median(pixels[interior], axis=0)
    direction = shape_rgb - background
    coverage = np.clip((offset @ direction) / float(direction @ direction), 0.0, 1.0)
    # Sub-noise differences are quantisation, not shape; when the two colours are close the
    # projection would magnify a one-level difference into a sizeable coverage.
    coverage[distance <= _NOISE_FLOOR] = 0.0
    return coverage, shape_rgb, background


def measure_image(rgb: np.ndarray) -> ShapeMeasurements:
    """Raw measurements behind `annotate_image`, for diagnostics and threshold tuning.

    Args:
        rgb: (H, W, 3) uint8 image with one shape on a plain background.

    Returns:
        The `ShapeMeasurements`.

    Raises:
        ValueError: The array is not (H, W, 3) or no shape stands out from the background.
    """
    coverage, shape_rgb, background = shape_coverage(rgb)
    height, width = rgb.shape[:2]
    mask = coverage >= COVERAGE_THRESHOLD
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("no shape found: no pixel is half covered by the shape colour")
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    fill = float(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean())
    names = list(REFERENCE_RGB)
    refs = np.array([REFERENCE_RGB[name] for name in names], dtype=np.float64)
    color = names[int(np.argmin(((refs - shape_rgb) ** 2).sum(axis=1)))]
    side = float(np.sqrt(box_area)) / min(width, height)
    return ShapeMeasurements(
        box=box,
        fill=fill,
        side=side,
        shape_rgb=(float(shape_rgb[0]), float(shape_rgb[1]), float(shape_rgb[2])),
        background_rgb=(float(background[0]), float(background[1]), float(background[2])),
        color=color,
    )


def annotate_image(rgb: np.ndarray) -> PixelAnnotation:
    """Box, colour, shape, size and position of the single shape in an image.

    Args:
        rgb: (H, W, 3) uint8 image with one shape on a plain background of any colour.

    Returns:
        The derived `PixelAnnotation` (box is x1, y1, x2, y2 in pixels, x2/y2 exclusive).

    Raises:
        ValueError: The array is not (H, W, 3) or no shape stands out from the background.
    """
    measured = measure_image(rgb)
    height, width = rgb.shape[:2]
    return PixelAnnotation(
        box=measured.box,
        color=measured.color,
        shape=_fill_to_shape(measured.fill),
        size=_size_class(measured.side),
        position=_position(measured.box, width, height),
    )


_PREPOSITION = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


def make_caption(color: str, shape: str, size: str, position: str) -> str:
    """A short caption, e.g. "a small red circle in the top left" or "... at the top"."""
    return f"a {size} {color} {shape} {_PREPOSITION[position]}"


def _image_files(split: str) -> list[tuple[int, Path]]:
    folder = data_root() / split / "images"
    files: list[tuple[int, Path]] = []
    for path in folder.glob("*.png"):
        if path.stem.isdigit():
            files.append((int(path.stem), path))
    files.sort()
    return files


def derive_annotations(split: str) -> list[ShapeAnnotation]:
    """Pixel-derived annotations for every image of an easy-VQA split, sorted by image id.

    Args:
        split: "train" or "test".

    Raises:
        EasyVqaNotInstalledError: The package is not installed.
        VlpError: Unknown split, or an image without a detectable shape.
    """
    _check_split(split)
    root = data_root()
    annotations: list[ShapeAnnotation] = []
    for image_id, path in _image_files(split):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        try:
            pixel = annotate_image(rgb)
        except ValueError as err:
            raise VlpError(f"{path}: {err}") from err
        height, width = rgb.shape[:2]
        annotations.append(
            ShapeAnnotation(
                image_id=image_id,
                split=split,
                key=path.relative_to(root).as_posix(),
                box=pixel.box,
                color=pixel.color,
                shape=pixel.shape,
                size=pixel.size,
                position=pixel.position,
                caption=make_caption(pixel.color, pixel.shape, pixel.size, pixel.position),
                width=width,
                height=height,
            )
        )
    logger.info("derived %d easy-VQA %s annotations", len(annotations), split)
    return annotations


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------

_C = "(?P<color>" + "|".join(EASYVQA_COLORS) + ")"
_S = "(?P<shape>" + "|".join(EASYVQA_SHAPES) + ")"


class _Template(NamedTuple):
    pattern: re.Pattern[str]
    # "color" / "shape": the answer names that attribute; "yesno": the answer says whether the
    # value named in the question is present.
    asks: str
    negated: bool


def _t(pattern: str, asks: str, negated: bool = False) -> _Template:
    return _Template(re.compile(f"^{pattern}\\?$"), asks, negated)


# Every template in easy-VQA 1.0, enumerated from both questions.json files: 24 question forms
# once colours and shapes are abstracted (8 open, 16 yes/no of which 8 negated). Open questions that name a value in the question itself
# ("what color is the circle?", "what is the blue shape?") assert that value too, because the
# generator only asks about the shape actually drawn.
_TEMPLATES: tuple[_Template, ...] = (
    _t("what color is the shape", "color"),
    _t(f"what color is the {_S}", "color"),
    _t("what is the color of the shape", "color"),
    _t(f"what is the color of the {_S}", "color"),
    _t(f"what is the {_C} shape", "shape"),
    _t("what shape does the image contain", "shape"),
    _t("what shape is in the image", "shape"),
    _t("what shape is present", "shape"),
    _t(f"does the image contain an? {_C} shape", "yesno"),
    _t(f"is an? {_C} shape present", "yesno"),
    _t(f"is there an? {_C} shape in the image", "yesno"),
    _t(f"is there an? {_C} shape", "yesno"),
    _t(f"does the image not contain an? {_C} shape", "yesno", negated=True),
    _t(f"is no {_C} shape present", "yesno", negated=True),
    _t(f"is there not an? {_C} shape in the image", "yesno", negated=True),
    _t(f"is there not an? {_C} shape", "yesno", negated=True),
    _t(f"does the image contain an? {_S}", "yesno"),
    _t(f"is an? {_S} present", "yesno"),
    _t(f"is there an? {_S} in the image", "yesno"),
    _t(f"is there an? {_S}", "yesno"),
    _t(f"does the image not contain an? {_S}", "yesno", negated=True),
    _t(f"is no {_S} present", "yesno", negated=True),
    _t(f"is there not an? {_S} in the image", "yesno", negated=True),
    _t(f"is there not an? {_S}", "yesno", negated=True),
)


@dataclass
class _Evidence:
    """What one image's questions say about one attribute."""

    stated: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)

    def determined(self, universe: Sequence[str]) -> str | None:
        """The value fixed by the answers, or None when open or contradictory."""
        if self.stated:
            if len(self.stated) == 1 and not (self.stated & self.excluded):
                return next(iter(self.stated))
            return None
        remaining = [value for value in universe if value not in self.excluded]
        return remaining[0] if len(remaining) == 1 else None

    def contradictory(self, universe: Sequence[str]) -> bool:
        """Whether the answers cannot all be true of a single shape."""
        return (
            len(self.stated) > 1
            or bool(self.stated & self.excluded)
            or all(value in self.excluded for value in universe)
        )


def parse_question(question: str, answer: str) -> dict[str, tuple[str, str]] | None:
    """What one question and its answer assert, or None for an unknown template.

    Args:
        question: Question text, e.g. "is there not a red shape?".
        answer: Its answer, e.g. "yes".

    Returns:
        {attribute: (kind, value)} with attribute "color" or "shape" and kind "is" or "not",
        e.g. {"color": ("not", "red")}; None when neither the template nor the answer fits.
    """
    text = question.strip().lower()
    answer = answer.strip().lower()
    for template in _TEMPLATES:
        match = template.pattern.match(text)
        if match is None:
            continue
        facts: dict[str, tuple[str, str]] = {}
        named = {key: value for key, value in match.groupdict().items() if value is not None}
        if template.asks == "yesno":
            if answer not in ("yes", "no"):
                return None
            present = (answer == "yes") != template.negated
            ((attribute, value),) = named.items()
            facts[attribute] = ("is" if present else "not", value)
            return facts
        universe = EASYVQA_COLORS if template.asks == "color" else EASYVQA_SHAPES
        if answer not in universe:
            return None
        facts[template.asks] = ("is", answer)
        for attribute, value in named.items():
            facts[attribute] = ("is", value)
        return facts
    return None


def check_against_questions(
    annotations: list[ShapeAnnotation],
    questions: tuple[list[str], list[str], list[int]],
) -> AgreementReport:
    """Compare derived colours and shapes with what each image's questions determine.

    Args:
        annotations: Derived annotations of one split.
        questions: (texts, answers, image_ids) of the same split, as `load_questions` or
            `easy_vqa.get_train_questions()` return them.

    Returns:
        The `AgreementReport`; questions of unknown templates are counted in it.
    """
    texts, answers, image_ids = questions
    by_id = {annotation.image_id: annotation for annotation in annotations}
    evidence: dict[int, dict[str, _Evidence]] = {
        image_id: {"color": _Evidence(), "shape": _Evidence()} for image_id in by_id
    }
    report = AgreementReport(images=len(annotations), questions=len(texts))
    for text, answer, image_id in zip(texts, answers, image_ids):
        facts = parse_question(text, answer)
        if facts is None:
            report.unknown_questions += 1
            if len(report.unknown_examples) < 10:
                report.unknown_examples.append(f"{text} -> {answer}")
            continue
        if image_id not in evidence:
            report.questions_without_image += 1
            continue
        for attribute, (kind, value) in facts.items():
            target = evidence[image_id][attribute]
            (target.stated if kind == "is" else target.excluded).add(value)
    if report.unknown_questions:
        logger.warning(
            "%d easy-VQA questions match no known template, e.g. %r",
            report.unknown_questions,
            report.unknown_examples[0],
        )
    for image_id in sorted(by_id):
        annotation = by_id[image_id]
        conflicting = False
        for attribute, universe in (("color", EASYVQA_COLORS), ("shape", EASYVQA_SHAPES)):
            found = evidence[image_id][attribute]
            derived = annotation.color if attribute == "color" else annotation.shape
            conflicting = conflicting or found.contradictory(universe)
            determined = found.determined(universe)
            if determined is not None:
                stated = int(bool(found.stated))
                if attribute == "color":
                    report.color_determined += 1
                    report.color_stated += stated
                    report.color_agree += int(derived == determined)
                else:
                    report.shape_determined += 1
                    report.shape_stated += stated
                    report.shape_agree += int(derived == determined)
                if derived != determined:
                    report.disagreements.append(
                        Disagreement(image_id, attribute, derived, determined)
                    )
            elif derived in found.excluded:
                report.disagreements.append(
                    Disagreement(image_id, attribute, derived, f"not {derived}")
                )
        report.conflicting_images += int(conflicting)
    return report


def write_boxes_jsonl(annotations: Sequence[ShapeAnnotation], path: str | Path) -> Path:
    """Write the `--boxes FILE.jsonl` file of `vlp extract-features`, one line per image.

    Each line is {"image": key, "width": w, "height": h, "boxes": [[x1, y1, x2, y2]],
    "labels": [shape]}; the shape name is the (ground-truth) object tag.

    Args:
        annotations: Derived annotations.
        path: Output file; its parent folder is created if needed.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for annotation in annotations:
            record = {
                "image": annotation.key,
                "width": annotation.width,
                "height": annotation.height,
                "boxes": [[float(v) for v in annotation.box]],
                "labels": [annotation.shape],
            }
            handle.write(json.dumps(record) + "\n")
    return out


# -- the reader: `easy-vqa` as a build-corpus source and an extract-features image source ------

NAME = "easy-vqa"
# For `vlp report`: the file `read` writes, its title, and what to say about it.
REPORT_NOTE = ("easy-vqa-agreement.json", "easy-VQA annotations vs answers",
               "Object tags here are ground-truth shape names derived from the pixels: the "
               "upper-bound setting of the Oscar paper, not detector tags.")
SOURCE_HELP = "`easy-vqa`: the embedded easy-VQA data (captions derived from the pixels, questions)"


def claims(spec: str) -> bool:
    return spec == NAME


def read(spec: str, workdir: Path) -> list[dict]:
    """Captions (derived from the pixels) and questions of the embedded easy-VQA data, as
    corpus examples (texts not yet tokenised).

    Writes the derived annotations and their agreement with the questions into `workdir`.
    """
    examples: list[dict] = []
    reports = {}
    with (workdir / "easy-vqa-annotations.jsonl").open("w", encoding="utf-8") as f:
        for split in SPLITS:
            anns = derive_annotations(split)
            questions = load_questions(split)
            report = check_against_questions(anns, questions)
            reports[split] = report.summary()
            logger.info("easy-VQA %s: %s", split, report.summary())
            by_id = {a.image_id: a for a in anns}
            for a in anns:
                f.write(json.dumps({"image": a.key, "box": a.box, "color": a.color,
                                    "shape": a.shape, "size": a.size, "position": a.position,
                                    "caption": a.caption}) + "\n")
                examples.append({"kind": "caption", "split": split, "images": [a.key],
                                 "texts": [a.caption], "label": None, "id": None,
                                 "source": NAME})
            for n, (q, ans, image_id) in enumerate(zip(*questions)):
                # One answer per question: scored 1 on an exact match (single-answer sets).
                examples.append({"kind": "vqa", "split": split, "images": [by_id[image_id].key],
                                 "texts": [q], "label": [ans], "id": f"{split}-{n}",
                                 "source": NAME})
    (workdir / "easy-vqa-agreement.json").write_text(json.dumps(reports, indent=2))
    return examples


def image_source(spec: str, scratch: Path) -> tuple[Path, Path | None]:
    """(image folder, given-boxes JSONL or None): the boxes and shape tags derived from the
    pixels, written into `scratch`."""
    anns = derive_annotations("train") + derive_annotations("test")
    return data_root(), write_boxes_jsonl(anns, scratch / "easy-vqa-boxes.jsonl")
