"""Pixel-derived easy-VQA annotations: real data checked against the questions, synthetic
images with known geometry, and the boxes JSONL format."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlp_cli import VlpError
from vlp_cli.readers import easyvqa
from vlp_cli.readers.easyvqa import (
    EASYVQA_COLORS,
    EASYVQA_SHAPES,
    POSITIONS,
    REFERENCE_RGB,
    ShapeAnnotation,
    annotate_image,
    check_against_questions,
    derive_annotations,
    load_questions,
    parse_question,
    write_boxes_jsonl,
)

needs_easy_vqa = pytest.mark.skipif(
    importlib.util.find_spec("easy_vqa") is None,
    reason="easy_vqa not installed (pip install easy-vqa==1.0)",
)


@pytest.fixture(scope="module")
def derived() -> dict[str, list[ShapeAnnotation]]:
    # Deriving both splits takes a few seconds; share it across the real-data tests.
    return {split: derive_annotations(split) for split in ("train", "test")}


# ------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------


@needs_easy_vqa
@pytest.mark.parametrize("split, count", [("train", 4000), ("test", 1000)])
def test_agrees_with_questions(
    derived: dict[str, list[ShapeAnnotation]], split: str, count: int
) -> None:
    annotations = derived[split]
    assert len(annotations) == count
    assert [a.image_id for a in annotations] == sorted(a.image_id for a in annotations)
    report = check_against_questions(annotations, load_questions(split))
    summary = f"{split}: {report.summary()}; first disagreements {report.disagreements[:5]}"
    assert report.images == count, summary
    assert report.unknown_questions == 0, f"{summary}; e.g. {report.unknown_examples}"
    assert report.questions_without_image == 0, summary
    # Most images have colour and shape pinned down by their questions (about 90%).
    assert report.color_determined >= 0.85 * count, summary
    assert report.shape_determined >= 0.85 * count, summary
    assert report.shape_agree == report.shape_determined, summary
    assert report.color_agree >= 0.998 * report.color_determined, summary
    shape_errors = [d for d in report.disagreements if d.field == "shape"]
    assert not shape_errors, summary


@needs_easy_vqa
def test_keys_boxes_and_captions(derived: dict[str, list[ShapeAnnotation]]) -> None:
    root = easyvqa.data_root()
    for split, anns in derived.items():
        for a in anns:
            assert a.split == split
            assert a.key == f"{split}/images/{a.image_id}.png"
            assert a.width == 64 and a.height == 64
            x1, y1, x2, y2 = a.box
            assert 0 <= x1 < x2 <= a.width and 0 <= y1 < y2 <= a.height
            # The generator's shapes are 8 to 33 px across at 64 px.
            assert 7 <= x2 - x1 <= 34 and 7 <= y2 - y1 <= 34, a
            assert a.color in EASYVQA_COLORS and a.shape in EASYVQA_SHAPES
            assert a.caption.startswith(f"a {a.size} {a.color} {a.shape} ")
        assert (root / anns[0].key).is_file()


@needs_easy_vqa
def test_sizes_and_positions_spread(derived: dict[str, list[ShapeAnnotation]]) -> None:
    for split, anns in derived.items():
        sizes = Counter(a.size for a in anns)
        positions = Counter(a.position for a in anns)
        message = f"{split}: sizes {dict(sizes)}, positions {dict(positions)}"
        # Thresholds are the train terciles, so each class holds about a third.
        for size in ("small", "medium", "large"):
            assert sizes[size] >= 0.25 * len(anns), message
        assert set(positions) == set(POSITIONS), message
        assert min(positions.values()) >= 0.03 * len(anns), message


@needs_easy_vqa
def test_questions_are_all_parsed() -> None:
    texts, answers, _ = load_questions("train")
    unknown = [(t, a) for t, a in zip(texts, answers) if parse_question(t, a) is None]
    assert not unknown, unknown[:5]


# ------------------------------------------------------------------------------------------
# Question parsing and the check itself
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question, answer, expected",
    [
        ("what color is the shape?", "blue", {"color": ("is", "blue")}),
        ("what color is the circle?", "red", {"color": ("is", "red"), "shape": ("is", "circle")}),
        (
            "what is the blue shape?",
            "rectangle",
            {"shape": ("is", "rectangle"), "color": ("is", "blue")},
        ),
        ("what shape is present?", "triangle", {"shape": ("is", "triangle")}),
        ("is there a red shape?", "yes", {"color": ("is", "red")}),
        ("is there a red shape?", "no", {"color": ("not", "red")}),
        ("does the image not contain a gray shape?", "yes", {"color": ("not", "gray")}),
        ("is there no red shape?", "yes", None),  # not an easy-VQA template
        ("is no teal shape present?", "no", {"color": ("is", "teal")}),
        ("is there not a triangle in the image?", "no", {"shape": ("is", "triangle")}),
        ("does the image contain a rectangle?", "no", {"shape": ("not", "rectangle")}),
        ("is there a circle?", "maybe", None),
        ("how many shapes are there?", "one", None),
    ],
)
def test_parse_question(question: str, answer: str, expected: dict | None) -> None:
    assert parse_question(question, answer) == expected


def _annotation(image_id: int, color: str, shape: str) -> ShapeAnnotation:
    return ShapeAnnotation(
        image_id=image_id,
        split="train",
        key=f"train/images/{image_id}.png",
        box=(1.0, 2.0, 11.0, 12.0),
        color=color,
        shape=shape,
        size="small",
        position="top left",
        caption=f"a small {color} {shape} in the top left",
        width=64,
        height=64,
    )


def test_check_counts_disagreements_and_unknowns() -> None:
    annotations = [_annotation(0, "red", "circle"), _annotation(1, "blue", "triangle")]
    others = [c for c in EASYVQA_COLORS if c != "green"]
    texts = ["what color is the circle?", "what is the color of the shape?", "is it round?"]
    answers = ["red", "red", "yes"]
    ids = [0, 0, 0]
    # Image 1: colour fixed only by elimination (green), shape excluded without being fixed.
    texts += [f"is there not a {c} shape?" for c in others]
    answers += ["yes"] * len(others)
    ids += [1] * len(others)
    texts += ["is there a triangle?", "what shape is present?"]
    answers += ["no", "circle"]
    ids += [1, 7]
    report = check_against_questions(annotations, (texts, answers, ids))
    assert report.images == 2
    assert report.unknown_questions == 1 and report.unknown_examples == ["is it round? -> yes"]
    assert report.questions_without_image == 1
    assert (report.color_determined, report.color_agree, report.color_stated) == (2, 1, 1)
    assert (report.shape_determined, report.shape_agree) == (1, 1)
    found = {(d.image_id, d.field, d.derived, d.from_questions) for d in report.disagreements}
    assert found == {(1, "color", "blue", "green"), (1, "shape", "triangle", "not triangle")}
    assert "colour determined 2, agree 1" in report.summary()
    assert "\n" not in report.summary()


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(easyvqa.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as info:
        easyvqa.data_root()
    message = str(info.value)
    assert "pip install easy-vqa==1.0" in message and "\n" not in message
    assert isinstance(info.value, VlpError)


# ------------------------------------------------------------------------------------------
# Synthetic images
# ------------------------------------------------------------------------------------------


def _canvas(
    background: tuple[int, ...], scale: int = 1
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (64 * scale, 64 * scale), background)
    return image, ImageDraw.Draw(image)


def _assert_box(actual: tuple[float, ...], expected: tuple[float, ...]) -> None:
    assert np.abs(np.array(actual) - np.array(expected)).max() <= 1.0, (actual, expected)


def test_red_circle_top_left_on_white() -> None:
    image, draw = _canvas((255, 255, 255))
    # PIL includes both end coordinates: columns/rows 3..16, so x2 = y2 = 17.
    draw.ellipse([3, 3, 16, 16], fill=REFERENCE_RGB["red"])
    box, color, shape, size, position = annotate_image(np.asarray(image))
    _assert_box(box, (3, 3, 17, 17))
    assert (color, shape, size, position) == ("red", "circle", "small", "top left")


def test_triangle_on_coloured_background() -> None:
    image, draw = _canvas((40, 60, 160))
    draw.polygon([(30, 56), (58, 56), (44, 32)], fill=REFERENCE_RGB["yellow"])
    box, color, shape, size, position = annotate_image(np.asarray(image))
    _assert_box(box, (30, 32, 59, 57))
    assert (color, shape, size, position) == ("yellow", "triangle", "large", "bottom right")


def test_rectangle_touching_the_border() -> None:
    image, draw = _canvas((250, 235, 240))
    draw.rectangle([0, 22, 19, 41], fill=REFERENCE_RGB["teal"])
    box, color, shape, _, position = annotate_image(np.asarray(image))
    _assert_box(box, (0, 22, 20, 42))
    assert (color, shape, position) == ("teal", "rectangle", "left")


def test_colour_close_to_background() -> None:
    # Gray on a slightly lighter gray: only 12 levels apart in every channel.
    image, draw = _canvas((140, 140, 140))
    draw.ellipse([36, 4, 59, 27], fill=REFERENCE_RGB["gray"])
    box, color, shape, _, position = annotate_image(np.asarray(image))
    _assert_box(box, (36, 4, 60, 28))
    assert (color, shape, position) == ("gray", "circle", "top right")


def test_black_shape_on_dark_background_centre() -> None:
    image, draw = _canvas((20, 20, 60))
    draw.rectangle([24, 26, 39, 37], fill=REFERENCE_RGB["black"])
    box, color, shape, _, position = annotate_image(np.asarray(image))
    _assert_box(box, (24, 26, 40, 38))
    assert (color, shape, position) == ("black", "rectangle", "center")


@pytest.mark.parametrize("shape", EASYVQA_SHAPES)
def test_antialiased_shapes(shape: str) -> None:
    # Drawn at 4x and downsampled, as the real images are, so the rim is blended.
    scale = 4
    image, draw = _canvas((235, 245, 232), scale)
    x1, y1, x2, y2 = 10, 34, 32, 56
    corners = [x1 * scale, y1 * scale, x2 * scale - 1, y2 * scale - 1]
    fill = REFERENCE_RGB["brown"]
    if shape == "circle":
        draw.ellipse(corners, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(corners, fill=fill)
    else:
        left, top, right, bottom = corners
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    small = image.resize((64, 64), Image.Resampling.BILINEAR)
    box, color, found, size, position = annotate_image(np.asarray(small))
    _assert_box(box, (x1, y1, x2, y2))
    assert (color, found, size, position) == ("brown", shape, "medium", "bottom left")


def test_random_shapes_any_background() -> None:
    # Random sizes, positions, colours and backgrounds (dark ones included), drawn at 1x, 2x
    # and 4x and downsampled the way the real generator does.
    rng = np.random.default_rng(0)
    failures = []
    for trial in range(300):
        scale = int(rng.choice([1, 2, 4]))
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        color = str(rng.choice(EASYVQA_COLORS))
        fill = REFERENCE_RGB[color]
        if np.abs(np.array(background) - fill).max() < 12:
            continue
        shape = str(rng.choice(EASYVQA_SHAPES))
        w = int(rng.integers(8, 34))
        h = {"circle": w, "triangle": round(w * 0.866)}.get(shape, int(rng.integers(8, 34)))
        x, y = int(rng.integers(0, 65 - w)), int(rng.integers(0, 65 - h))
        image, draw = _canvas(background, scale)
        c = [x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1]
        if shape == "circle":
            draw.ellipse(c, fill=fill)
        elif shape == "rectangle":
            draw.rectangle(c, fill=fill)
        else:
            draw.polygon([(c[0], c[3]), (c[2], c[3]), ((c[0] + c[2]) / 2, c[1])], fill=fill)
        if scale > 1:
            image = image.resize((64, 64), Image.Resampling.BILINEAR)
        found = annotate_image(np.asarray(image))
        error = np.abs(np.array(found.box) - [x, y, x + w, y + h]).max()
        if (found.color, found.shape) != (color, shape) or error > 1:
            failures.append((trial, scale, background, color, shape, (x, y, w, h), found))
    assert not failures, failures[:5]


def test_blank_image_is_rejected() -> None:
    image, _ = _canvas((200, 200, 200))
    with pytest.raises(ValueError, match="no shape"):
        annotate_image(np.asarray(image))


def test_size_thresholds_order() -> None:
    small, large = easyvqa.SIZE_THRESHOLDS
    assert 0 < small < large < 1


# ------------------------------------------------------------------------------------------
# Boxes JSONL
# ------------------------------------------------------------------------------------------


def test_boxes_jsonl_round_trip(tmp_path: Path) -> None:
    annotations = [_annotation(3, "red", "circle"), _annotation(12, "green", "triangle")]
    path = write_boxes_jsonl(annotations, tmp_path / "sub" / "boxes.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records[0] == {
        "image": "train/images/3.png",
        "width": 64,
        "height": 64,
        "boxes": [[1.0, 2.0, 11.0, 12.0]],
        "labels": ["circle"],
    }
    assert [list(r) for r in records] == [["image", "width", "height", "boxes", "labels"]] * 2
    assert records[1]["labels"] == ["triangle"]
