"""The whole CLI chain on a handful of real easy-VQA images, through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_recipe_sets
from vlp_cli.cli import app

runner = CliRunner()


def vlp(*args: str | Path, ok: bool = True) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result.stdout


def sets(drop: tuple[str, ...] = ()) -> list[str]:
    out = []
    for s in tiny_recipe_sets():
        if s not in drop:
            out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 easy-VQA images copied into a folder, with given boxes, captions and questions."""
    from PIL import Image

    from vlp_cli.readers import easyvqa

    root = tmp_path_factory.mktemp("chain")
    src = easyvqa.data_root()
    qs = {s: easyvqa.load_questions(s) for s in ("train", "test")}
    boxes, data = [], []
    for split, ids in (("train", range(12)), ("test", range(4))):
        for i in ids:
            key = f"{split}/{i}.png"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / split / "images" / f"{i}.png", root / "images" / key)
            rgb = np.asarray(Image.open(root / "images" / key).convert("RGB"))
            ann = easyvqa.annotate_image(rgb)
            boxes.append({"image": key, "boxes": [list(ann.box)], "labels": [ann.shape]})
            data.append({"image": key, "split": split,
                         "caption": easyvqa.make_caption(ann.color, ann.shape, ann.size,
                                                         ann.position)})
            for q, a, img in zip(*qs[split]):
                if img == i:
                    data.append({"image": key, "split": split, "question": q, "answers": [a]})
    (root / "boxes.jsonl").write_text("\n".join(json.dumps(b) for b in boxes) + "\n")
    (root / "data.jsonl").write_text("\n".join(json.dumps(d) for d in data) + "\n")
    return {"root": root, "images": root / "images", "boxes": root / "boxes.jsonl",
            "data": root / "data.jsonl"}


def test_help_lists_every_stage_without_importing_torch() -> None:
    out = vlp("--help")
    for cmd in ("extract-features", "build-corpus", "pretrain", "finetune", "evaluate",
                "caption", "validate", "inspect", "bench"):
        assert cmd in out
    code = "import sys, vlp_cli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_whole_chain(images: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path
    f, c = d / "features", d / "corpus"
    vlp("extract-features", images["images"], "--out", f, "--boxes", images["boxes"], *sets())
    info = json.loads(vlp("inspect", f, "--json"))
    assert info["kind"] == "feature store" and info["images"] == 16
    assert info["feature_dim"] == 1280 and info["boxes_per_image"]["max"] == 1
    assert set(info["images_per_tag (conf >= 0.2)"]) <= {"circle", "rectangle", "triangle"}

    vlp("build-corpus", images["data"], "--features", f, "--out", c, *sets())
    info = json.loads(vlp("inspect", c, "--json"))
    assert info["counts"]["caption/test"] == 4 and info["counts"]["vqa/test"] > 0
    assert info["meta"]["features"]["feature_dim"] == 1280

    vlp("pretrain", "recipes/tiny.yaml", "-c", c, "-f", f, "-o", d / "pre", *sets())
    info = json.loads(vlp("inspect", d / "pre", "--json"))
    assert info["task"] == "pretrain" and info["step"] == 3 and info["resumable"]

    for task in ("vqa", "retrieval", "captioning"):
        vlp("finetune", task, "-k", d / "pre", "-c", c, "-f", f, "-o", d / task)
        out = json.loads(vlp("evaluate", task, "-k", d / task, "-c", c, "-f", f))
        assert out["task"] == task and out["split"] == "test"
        # A folder of its own beside the checkpoint; nothing written into the checkpoint.
        assert (d / f"eval-{task}-test" / "predictions.jsonl").is_file()
        assert json.loads((d / f"eval-{task}-test" / "metrics.json").read_text()) == out
        assert not list((d / task).glob("eval*"))
        if task == "vqa":
            assert 0 <= out["vqa_accuracy"] <= 100 and out["questions"] > 0
        elif task == "retrieval":
            assert out["images"] == out["texts"] == out["unique_caption_images"]
            assert 0 <= out["i2t_r1"] <= out["i2t_r5"] <= out["i2t_r10"] <= 100
        else:
            assert out["images"] == 4 and "cider" in out and "bleu4" in out
            coco = json.loads((d / "eval-captioning-test" / "captions_results.json").read_text())
            assert len(coco) == 4 and all(isinstance(r["image_id"], int) and
                                          isinstance(r["caption"], str) for r in coco)

    vlp("caption", "-k", d / "captioning", "-f", f, "-c", c, "--split", "test",
        "-o", d / "captions.jsonl")
    caps = [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == 4 and all("references" in x and isinstance(x["caption"], str)
                                  for x in caps)
    vlp("caption", "-k", d / "captioning", "-f", f, "-c", c, "--split", "test", "--beam", "3",
        "-o", d / "beams.jsonl")
    beams = [json.loads(x) for x in (d / "beams.jsonl").read_text().splitlines()]
    assert [x["image"] for x in beams] == [x["image"] for x in caps]
    assert all(isinstance(x["caption"], str) for x in beams)
    vlp("caption", "-k", d / "captioning", "-f", f, "--limit", "2", "--set",
        "captioning.sample=true", "--set", "captioning.top_k=5", "--set",
        "captioning.beam_size=1", "-o", d / "sampled.jsonl")
    assert len((d / "sampled.jsonl").read_text().splitlines()) == 2
    vlp("caption", "-k", d / "captioning", "-f", f, "--limit", "2", "--beam", "2",
        "--constrain-tags", "-o", d / "constrained.jsonl")
    # Each image has one tag, its shape; a caption may use it in the singular or the plural.
    tag_words = {"circle", "rectangle", "triangle", "circles", "rectangles", "triangles"}
    for x in (json.loads(y) for y in (d / "constrained.jsonl").read_text().splitlines()):
        assert tag_words & set(x["caption"].split()), x
    # Raw images: features are extracted the way the checkpoint's were (given boxes here).
    vlp("caption", "-k", d / "captioning", "--images", images["images"] / "test",
        "--boxes", images["boxes"], "-o", d / "from-images.jsonl", "--draw", d / "drawn")
    from PIL import Image

    drawn = sorted(p.name for p in (d / "drawn").iterdir())
    assert drawn == [f"{i}.png.jpg" for i in range(4)]
    with Image.open(d / "drawn" / "0.png.jpg") as im, \
            Image.open(images["images"] / "test" / "0.png") as src:
        assert im.size[0] == src.size[0] and im.size[1] > src.size[1]  # the caption band
    from_images = [json.loads(x) for x in (d / "from-images.jsonl").read_text().splitlines()]
    assert sorted(x["image"] for x in from_images) == [f"{i}.png" for i in range(4)]
    # Same pixels, same extractor rebuilt from the store's metadata: the same features (up to
    # fp16 and thread-count rounding; captions of a tiny random model can flip on such ties).
    from vlp_cli.extractors.images import list_images, read_boxes_jsonl
    from vlp_cli.extractors.pipeline import Extractor, extract_batches
    from vlp_cli.stores.features import FeatureStore

    store = FeatureStore(f)
    ext = Extractor.from_meta(store.meta, read_boxes_jsonl(images["boxes"]))
    for batch in extract_batches(list_images(images["images"])[:6], ext, 3, 0):
        for key, regions, error, _ in batch:
            assert error is None
            want = store.get(key)
            np.testing.assert_allclose(regions.features.astype(np.float32),
                                       want.features.astype(np.float32), rtol=2e-2, atol=2e-2)
            np.testing.assert_array_equal(regions.boxes, want.boxes)
    out = vlp("report", d)
    assert "vqa_accuracy" in out and "i2t_r1" in out

    # A pre-trained checkpoint must not pretend to caption.
    res = runner.invoke(app, ["caption", "-k", str(d / "pre"), "-f", str(f), "-o",
                              str(d / "x.jsonl")])
    assert res.exit_code == 1 and "finetune captioning" in res.output
    res = runner.invoke(app, ["caption", "-k", str(d / "captioning"), "-f", str(f), "-o",
                              str(d / "x.jsonl"), "--draw", str(d / "nope")])
    assert res.exit_code == 1 and "--draw needs the pixels" in res.output

    # Answers and match scores straight from image files, and the same through Python.
    test_images, one = images["images"] / "test", images["images"] / "test" / "0.png"
    out = vlp("answer", one, "what shape is in the image?", "-k", d / "vqa", "--boxes",
              images["boxes"], "--top", "3", "-o", d / "answers.jsonl", "--draw", d / "qa")
    assert (d / "qa" / "0.png.jpg").is_file()
    row = json.loads(out.strip().splitlines()[-1])
    assert row["image"] == "0.png" and len(row["answers"]) == 3
    scores = [a["score"] for a in row["answers"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= x <= 1 for x in scores)
    assert json.loads((d / "answers.jsonl").read_text()) == row
    from vlp_cli.infer import Predictor

    vqa = Predictor(d / "vqa", boxes=images["boxes"])
    py = vqa.answer(one, "what shape is in the image?", top=3)["0.png"]
    assert [a for a, _ in py] == [a["answer"] for a in row["answers"]]
    out = vlp("score", test_images, "a small red circle", "a large blue square", "-k",
              d / "retrieval", "--boxes", images["boxes"])
    rows = [json.loads(x) for x in out.strip().splitlines() if x.startswith("{")]
    assert [r["image"] for r in rows] == [f"{i}.png" for i in range(4)]
    for r in rows:
        assert {s["text"] for s in r["scores"]} == {"a small red circle", "a large blue square"}
        assert r["scores"][0]["score"] >= r["scores"][1]["score"]
    # A checkpoint never fine-tuned for the request is refused in one line.
    res = runner.invoke(app, ["answer", str(one), "what?", "-k", str(d / "captioning")])
    assert res.exit_code == 1 and "finetune vqa" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["score", str(one), "a circle", "-k", str(d / "vqa")])
    assert res.exit_code == 1 and "finetune retrieval" in res.output
    # Without the given boxes the checkpoint was trained on: the embedded detector, a warning.
    pred = Predictor(d / "captioning")
    caps = pred.caption(test_images)
    assert sorted(caps) == [f"{i}.png" for i in range(4)]
    # One call's --beam is that call's: the next call decodes as the recipe says again.
    beam_size = pred.task.recipe.captioning.beam_size
    pred.caption(test_images, beam=beam_size + 2, limit=1)
    assert pred.task.recipe.captioning.beam_size == beam_size
    assert pred.caption(test_images) == caps


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("pretrain:\n  trian: {}\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1 and "unknown key 'pretrain.trian'" in res.output
    assert "did you mean 'train'" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "not a vlp" in res.output
    res = runner.invoke(app, ["build-corpus", "easy-vqa", "-f", str(tmp_path / "nope"),
                              "-o", str(tmp_path / "c")])
    assert res.exit_code == 1 and "does not exist" in res.output
    assert not (tmp_path / "c").exists()
    assert len(vlp("validate", "recipes/tiny.yaml").splitlines()) > 20


def test_missing_image_key_is_reported_with_its_line(tiny_data: dict, tmp_path: Path) -> None:
    src = tmp_path / "caps.jsonl"
    src.write_text('{"image": "img/0.png", "caption": "a thing"}\n'
                   '{"image": "img/404.png", "caption": "gone"}\n')
    res = runner.invoke(app, ["build-corpus", str(src), "-f", str(tiny_data["features"]),
                              "-o", str(tmp_path / "c")])
    assert res.exit_code == 1
    assert f"{src} line 2" in res.output and "img/404.png" in res.output
    assert "--skip-missing" in res.output and not (tmp_path / "c").exists()
    vlp("build-corpus", src, "-f", tiny_data["features"], "-o", tmp_path / "c",
        "--skip-missing")
    assert json.loads(vlp("inspect", tmp_path / "c", "--json"))["examples"] == 1


@pytest.mark.slow
def test_whole_chain_with_the_embedded_text_encoder(images: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """The same chain with real MiniLM weights (the demo's model), a few steps per stage."""
    d = tmp_path
    f, c = d / "features", d / "corpus"
    real = sets(drop=("model.init=random:tiny",))
    vlp("extract-features", images["images"], "-o", f, "--boxes", images["boxes"], *real)
    vlp("build-corpus", images["data"], "-f", f, "-o", c, *real)
    vlp("pretrain", "recipes/tiny.yaml", "-c", c, "-f", f, "-o", d / "pre", *real)
    info = json.loads(vlp("inspect", d / "pre", "--json"))
    assert info["encoder"]["hidden_size"] == 384 and info["encoder"]["num_hidden_layers"] == 6
    assert info["meta"]["init"] == "embedded:minilm"
    vlp("finetune", "vqa", "-k", d / "pre", "-c", c, "-f", f, "-o", d / "vqa")
    out = json.loads(vlp("evaluate", "vqa", "-k", d / "vqa", "-c", c, "-f", f))
    assert out["questions"] > 0 and 0 <= out["vqa_accuracy"] <= 100
