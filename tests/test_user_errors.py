"""A user's mistake is one line naming what to fix, found before any work starts; settings that
were not the user's are said; progress is visible off a terminal."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlp_cli import VlpError
from vlp_cli.cli import app

runner = CliRunner()
RECIPES = Path(__file__).parent.parent / "recipes"


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def help_text(*args: str) -> str:
    """A command's --help as one line of words (rich's boxes and wrapping removed)."""
    out = run(*args, "--help")
    assert out.exit_code == 0
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", out.output).split())


def one_line_error(res, *needles: str) -> str:
    """The run failed with exit status 1 and one `error:` line holding every needle."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    errors = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def checkpoints(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-step pre-trained checkpoint and vqa and captioning checkpoints fine-tuned from it."""
    from vlp_cli.stages import finetune, pretrain

    from conftest import tiny_recipe_sets
    from vlp_cli.config import load_recipe

    root = tmp_path_factory.mktemp("ckpts")
    one_step = [f"{t}.train.{k}" for t in ("pretrain", "vqa", "captioning")
                for k in ("steps=1", "warmup_steps=0", "eval_every=0", "eval_batches=1")]
    recipe = load_recipe("tiny", tiny_recipe_sets() + one_step)
    pretrain.run(recipe, tiny_data["corpus"], tiny_data["features"], root / "pre")
    out = {"pre": root / "pre"}
    for task in ("vqa", "captioning"):
        finetune.run(task, root / "pre", tiny_data["corpus"], tiny_data["features"],
                     root / task, recipe)
        out[task] = root / task
    return out


# 1. recipes are checked before anything runs ---------------------------------------------------

BAD = [
    ("pretrain.train.steps=0", "'pretrain.train.steps' must be >= 1"),
    ("pretrain.train.steps=-5", "'pretrain.train.steps' must be >= 1"),
    ("vqa.train.batch_size=0", "'vqa.train.batch_size' must be >= 1"),
    ("pretrain.train.lr=-1", "'pretrain.train.lr' must be > 0"),
    ("pretrain.train.lr=0", "'pretrain.train.lr' must be > 0"),
    ("retrieval.train.log_every=0", "'retrieval.train.log_every' must be >= 1"),
    ("captioning.train.grad_accum=0", "'captioning.train.grad_accum' must be >= 1"),
    ("pretrain.train.weight_decay=-0.1", "'pretrain.train.weight_decay' must be >= 0"),
    ("pretrain.train.betas=[0.9, 1.0]", "'pretrain.train.betas[1]' must be in [0, 1)"),
    ("pretrain.train.max_grad_norm=-1", "'pretrain.train.max_grad_norm' must be >= 0"),
    ("pretrain.train.save_every=-1", "'pretrain.train.save_every' must be >= 0"),
    ("pretrain.train.eval_every=-1", "'pretrain.train.eval_every' must be >= 0"),
    ("pretrain.train.lr=.nan", "'pretrain.train.lr' must be a finite number"),
    ("data.max_text_len=2", "'data.max_text_len' must be >= 5"),
    ("vqa.max_text_len=4", "'vqa.max_text_len' must be >= 5"),
    ("captioning.max_caption_len=0", "'captioning.max_caption_len' must be >= 1"),
    ("oscar.mask_prob=1.5", "'oscar.mask_prob' must be in [0, 1]"),
    ("pretrain.pollute_prob=-0.1", "'oscar.pollute_prob' must be in [0, 1]"),
    ("corpus.val_fraction=1", "'corpus.val_fraction' must be in [0, 1)"),
    ("retrieval.shared_tag_negatives=2", "'retrieval.shared_tag_negatives' must be in [0, 1]"),
    ("data.conf_th=1.2", "'data.conf_th' must be in [0, 1]"),
    ("extract.keep_conf_th=-1", "'extract.keep_conf_th' must be in [0, 1]"),
    ("extract.nms_iou=3", "'extract.nms_iou' must be in [0, 1]"),
    ("captioning.label_smoothing=1", "'captioning.label_smoothing' must be in [0, 1)"),
    ("model.img_dropout=1.1", "'model.img_dropout' must be in [0, 1]"),
    ("extract.min_size=0", "'extract.min_size' must be >= 1"),
    ("extract.min_size=300", "'extract.min_size' (300) is more than 'extract.max_size' (256)"),
    ("extract.roi_output=0", "'extract.roi_output' must be >= 1"),
    ("extract.commit_every=0", "'extract.commit_every' must be >= 1"),
    ("extract.detector_input=100", "'extract.detector_input' must be 0"),
    ("data.max_regions=0", "'data.max_regions' must be >= 1"),
    ("data.min_boxes=20", "'data.min_boxes' (20) is more than 'data.max_boxes' (9)"),
    ("pretrain.caption_pollute_prob=0.75", "cannot exceed it"),
    ("seed=-1", "'seed' must be in [0, 4.29497e+09]"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    one_line_error(run("validate", "tiny", "--set", override), message)


def test_bad_value_in_a_recipe_file_names_the_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("pretrain:\n  train:\n    steps: 0\n")
    one_line_error(run("validate", p), str(p), "'pretrain.train.steps' must be >= 1", "got 0")


def test_warmup_longer_than_the_run_names_both_keys_and_the_fix() -> None:
    line = one_line_error(run("validate", "tiny", "--set", "pretrain.train.steps=10", "--set",
                              "pretrain.train.warmup_steps=45"),
                          "'pretrain.train.warmup_steps' (45)", "'pretrain.train.steps' (10)")
    assert "--set pretrain.train.warmup_steps=" in line
    assert run("validate", "tiny", "--set", "pretrain.train.steps=10", "--set",
               "pretrain.train.warmup_steps=1").exit_code == 0


def test_a_stage_refuses_a_bad_recipe_before_it_starts(tiny_data: dict, tmp_path: Path) -> None:
    """`steps: 0` used to write a "pretrained" checkpoint of random weights with exit 0."""
    out = tmp_path / "pre"
    res = run("pretrain", "tiny", "-c", tiny_data["corpus"], "-f", tiny_data["features"],
              "-o", out, "--set", "pretrain.train.steps=0")
    one_line_error(res, "'pretrain.train.steps' must be >= 1")
    assert not out.exists()
    res = run("build-corpus", tiny_data["source"], "-f", tiny_data["features"], "-o",
              tmp_path / "c", "--set", "corpus.val_fraction=2")
    one_line_error(res, "'corpus.val_fraction'")
    assert not (tmp_path / "c").exists()


def test_defaults_and_shipped_recipes_pass_their_own_checks() -> None:
    from vlp_cli.config import Recipe, check, recipe_from_dict

    recipe_from_dict({})
    r = Recipe()
    for section in ("extract", "corpus", "data", "model", "pretrain", "vqa", "retrieval",
                    "captioning"):
        check(getattr(r, section), section)
    for p in RECIPES.glob("*.yaml"):
        assert run("validate", p).exit_code == 0


# 2. built-in recipe names ------------------------------------------------------------------------


def test_builtin_recipes_by_name_and_by_missing_path(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.config import builtin_recipes, load_recipe

    assert {"tiny", "oscar-base"} <= set(builtin_recipes())
    monkeypatch.chdir(tmp_path)  # outside the clone: recipes/tiny.yaml is not here
    assert load_recipe("recipes/tiny.yaml") == load_recipe("tiny") == load_recipe("tiny.yaml")
    res = run("validate", "recipes/tiny.yaml")
    assert res.exit_code == 0 and "name: tiny" in res.stdout
    line = one_line_error(run("validate", "recipes/tinyy.yaml"), "recipes/tinyy.yaml not found")
    assert "oscar-base" in line and "tiny" in line
    (tmp_path / "folder").mkdir()
    one_line_error(run("validate", "folder"), "is a folder")


def test_builtin_names_are_in_the_help() -> None:
    for cmd in ("validate", "pretrain"):
        out = help_text(cmd)
        assert "oscar-base" in out and "tiny" in out, cmd
    assert "--debug" in help_text()


# 3. settings that were not the user's are said once -----------------------------------------------


def test_no_recipe_uses_the_defaults_made_for_photos_and_says_so(tmp_path: Path) -> None:
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        (imgs / f"{i}.png").write_bytes((easy_vqa_root() / "train" / "images" /
                                         f"{i}.png").read_bytes())
    res = run("extract-features", imgs, "-o", tmp_path / "f", "--set", "extract.detector=grid")
    assert res.exit_code == 0, res.output
    said = [x for x in res.output.splitlines() if "no --recipe" in x]
    assert len(said) == 1
    assert "extract.*" in said[0] and "min_size 224" in said[0] and "max_size 640" in said[0]
    assert "detector " not in said[0]  # given with --set: the user's, not said
    stored = json.loads(run("inspect", tmp_path / "f", "--json").stdout)
    assert stored["recipe"] and "min_size: 224" in Path(stored["recipe"]).read_text()


def test_build_corpus_without_a_recipe_says_val_fraction(tiny_data: dict, tmp_path: Path) -> None:
    res = run("build-corpus", tiny_data["source"], "-f", tiny_data["features"], "-o",
              tmp_path / "c", "--set", "model.init=random:tiny")
    assert res.exit_code == 0, res.output
    said = [x for x in res.output.splitlines() if "no --recipe" in x]
    assert len(said) == 1 and "val_fraction 0.1" in said[0] and "'val'" in said[0]


def test_a_recipe_without_a_section_says_which_defaults(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from vlp_cli.config import load_stage_recipe

    p = tmp_path / "r.yaml"
    p.write_text("name: r\ncorpus:\n  val_fraction: 0.2\n")
    with caplog.at_level(logging.INFO, logger="vlp_cli.config"):
        r = load_stage_recipe(p, ["extract.min_size=64"], ["extract", "corpus"])
    assert r.extract.min_size == 64 and r.corpus.val_fraction == 0.2
    lines = [x.getMessage() for x in caplog.records]
    assert len(lines) == 1 and "no 'extract' section" in lines[0]
    assert "max_size 640" in lines[0] and "min_size" not in lines[0]
    assert "corpus" not in lines[0]


def test_finetune_without_a_recipe_says_it_uses_the_checkpoints(
        checkpoints: dict, tiny_data: dict, tmp_path: Path) -> None:
    res = run("evaluate", "vqa", "-k", checkpoints["vqa"], "-c", tiny_data["corpus"],
              "-f", tiny_data["features"], "--out", tmp_path / "m")
    assert res.exit_code == 0, res.output
    said = [x for x in res.output.splitlines() if "no --recipe" in x]
    assert len(said) == 1 and str(checkpoints["vqa"] / "recipe.yaml") in said[0]


# 4. one line, never a traceback; --debug shows it ---------------------------------------------


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("pretrain:\n  trian: {}\n")
    one_line_error(run("validate", p), "unknown key 'pretrain.trian'")
    res = run("--debug", "validate", p)
    assert isinstance(res.exception, VlpError) and res.exit_code == 1


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlp_cli.stages import inspect as stage

    def broken(path: Path) -> dict:
        raise KeyError("a bug")

    monkeypatch.setattr(stage, "describe", broken)
    res = run("inspect", tmp_path)
    assert isinstance(res.exception, KeyError)


def test_user_caused_exceptions_become_one_line(tmp_path: Path) -> None:
    from vlp_cli.errors import user_message

    f = tmp_path / "given"
    assert "does not exist" in user_message(FileNotFoundError(2, "No such file", str(f / "x")),
                                            [f])
    # A missing file that is none of the user's paths is a bug: keep the traceback.
    assert user_message(FileNotFoundError(2, "No such file", "/pkg/asset.bin"), [f]) is None
    msg = user_message(PermissionError(13, "Permission denied", str(f)), [])
    assert str(f) in msg and "permission denied" in msg
    assert "read-only" in user_message(OSError(30, "Read-only file system", str(f)), [])
    assert "is a folder" in user_message(IsADirectoryError(21, "Is a directory", str(f)), [])

    def parse(path: Path) -> None:
        json.loads("{oops")

    try:
        parse(tmp_path / "meta.json")
    except json.JSONDecodeError as exc:
        msg = user_message(exc, [])
    assert msg.startswith(f"{tmp_path / 'meta.json'} is not valid JSON") and "line 1" in msg
    lmdb_error = type("InvalidError", (Exception,), {"__module__": "lmdb"})
    assert "vlp store" in user_message(lmdb_error("/x: MDB_INVALID"), [])
    assert user_message(RuntimeError("bug"), []) is None


def test_corrupt_lmdb_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "data.mdb").write_bytes(b"\x07" * 20000)
    one_line_error(run("inspect", store), str(store), "vlp store")


def test_outputs_are_checked_before_work_and_no_empty_folder_is_left(
        tmp_path: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(run("build-corpus", tiny_data["source"], "-f", tiny_data["features"],
                       "-o", blocker / "corpus"), "a-file is a file")
    one_line_error(run("extract-features", tmp_path, "-o", blocker), "is a file")
    # A refusal after the stage made its folder (here: a corpus from other features) leaves
    # no folder behind, nor the parents made for it.
    other = tmp_path / "other-features"
    from conftest import make_regions
    import numpy as np
    from vlp_cli.stores.features import FeatureStoreWriter

    w = FeatureStoreWriter(other, {"extractor": {"name": "x"}, "feature_dim": 16,
                                   "labels": ["a"]})
    w.put("img/0.png", make_regions(np.random.default_rng(1), 3, 16))
    w.close()
    out = tmp_path / "new" / "pre"
    res = run("pretrain", "tiny", "-c", tiny_data["corpus"], "-f", other, "-o", out,
              "--set", "model.init=random:tiny")
    one_line_error(res, "--features")
    assert not (tmp_path / "new").exists()


def test_read_only_output_is_refused_before_work(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from vlp_cli import outputs

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):  # a read-only mount, even for root
        if dir is not None and Path(dir) == ro:
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", refuse)
    with pytest.raises(VlpError, match="read-only file system"):
        outputs.check_writable(ro / "sub" / "out")
    # evaluate refuses before loading anything (the checkpoint need not even exist)
    res = run("evaluate", "vqa", "-k", tmp_path / "ckpt", "-c", tmp_path, "-f", tmp_path,
              "--out", ro / "m")
    one_line_error(res, str(ro / "m"), "read-only")


def test_output_dir_removes_only_what_it_made_and_left_empty(tmp_path: Path) -> None:
    from vlp_cli.outputs import output_dir

    with pytest.raises(VlpError):
        with output_dir(tmp_path / "a" / "b"):
            assert (tmp_path / "a" / "b").is_dir()
            raise VlpError("refused")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "c") as out:
            (out / "part").write_text("written")
            raise RuntimeError("failed after writing")
    assert (tmp_path / "c" / "part").is_file()  # kept: something was written
    (tmp_path / "d").mkdir()
    with pytest.raises(VlpError):
        with output_dir(tmp_path / "d"):
            raise VlpError("refused")
    assert (tmp_path / "d").is_dir()  # it existed before


def test_evaluate_prints_its_metrics_when_the_write_fails(
        checkpoints: dict, tiny_data: dict, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.stages import evaluate

    monkeypatch.setattr(evaluate, "check_writable", lambda *a, **k: None)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run("evaluate", "vqa", "-k", checkpoints["vqa"], "-c", tiny_data["corpus"],
              "-f", tiny_data["features"], "--out", blocker / "m")
    one_line_error(res, "could not write", "printed above")
    assert '"vqa_accuracy"' in res.stdout


# 5. progress off a terminal ----------------------------------------------------------------------


def test_progress_off_a_terminal_logs_lines(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from rich.console import Console

    from vlp_cli import console

    fake = io.StringIO()  # not a tty
    monkeypatch.setattr(console, "console", Console(file=fake))
    monkeypatch.setenv("VLP_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="vlp_cli.progress"):
        with console.progress() as bar:  # as the training loop drives it
            task = bar.add_task("train", total=6, completed=2)
            for step in range(3, 7):
                bar.update(task, completed=step)
                if step % 2 == 0:
                    bar.update(task, description=f"train loss {1 / step:.3f}")
        items = list(console.track(range(4), description="items"))
    assert items == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    train = [x for x in lines if x.startswith("train")]
    assert len(train) == 4  # steps 3, 4, 5 as they happen, the end once
    assert re.match(r"train: 3/6 \(50%\), [\d.,]+/s, \d+s left", train[0]), train[0]
    assert train[-1].startswith("train loss 0.167: 6/6 (100%)") and "took" in train[-1]
    assert [x for x in lines if x.startswith("items")][-1].startswith("items: 4/4 (100%)")
    assert fake.getvalue() == ""  # no bar drawn into the log


def test_progress_interval_and_fields(monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    from rich.console import Console

    from vlp_cli import console

    monkeypatch.setattr(console, "console", Console(file=io.StringIO()))
    monkeypatch.setenv("VLP_PROGRESS_EVERY", "30")
    with caplog.at_level(logging.INFO, logger="vlp_cli.progress"):
        with console.progress() as bar:
            now = [0.0]
            bar.get_time = lambda: now[0]
            task = bar.add_task("extract", total=None, loss=0.5)
            for _ in range(10):
                now[0] += 10
                bar.advance(task, 2)
    lines = [r.getMessage() for r in caplog.records]
    # 100 s in 10 s steps: a line at 30, 60 and 90 s, then the end.
    assert len(lines) == 4, lines
    assert lines[0].startswith("extract: 6 done") and "loss 0.5" in lines[0]
    assert lines[-1].startswith("extract: 20 done")


# 6. what `answers` means -------------------------------------------------------------------------


def test_build_corpus_help_says_answers_are_annotators() -> None:
    out = help_text("build-corpus")
    assert "annotator" in out and "min(1" in out and "0.17" in out


def test_the_rule_in_the_help_is_the_metric() -> None:
    from vlp_cli.tasks.vqa import vqa_target_scores

    assert vqa_target_scores(["pagoda", "temple"]) == pytest.approx(
        {"pagoda": 1 / 6, "temple": 1 / 6})
    ten = ["w"] * 1 + ["x"] * 2 + ["y"] * 3 + ["z"] * 4
    assert vqa_target_scores(ten) == pytest.approx({"w": 0.3, "x": 0.6, "y": 0.9, "z": 1.0})


# 7. caption -o DIR/ ------------------------------------------------------------------------------


def test_caption_into_a_folder(checkpoints: dict, tiny_data: dict, tmp_path: Path) -> None:
    from vlp_cli.stages.caption import output_path

    assert output_path("caps.jsonl") == Path("caps.jsonl")
    assert output_path("new/") == Path("new/captions.jsonl")
    assert output_path(tmp_path) == tmp_path / "captions.jsonl"
    for out, want in ((tmp_path, tmp_path / "captions.jsonl"),
                      (f"{tmp_path / 'fresh'}/", tmp_path / "fresh" / "captions.jsonl")):
        res = run("caption", "-k", checkpoints["captioning"], "-f", tiny_data["features"],
                  "--limit", "2", "-o", out)
        assert res.exit_code == 0, res.output
        assert len(want.read_text().splitlines()) == 2
    assert "folder to hold captions.jsonl" in help_text("caption")


def test_a_misspelt_tracker_is_one_line() -> None:
    one_line_error(run("validate", "tiny", "--set", "pretrain.train.trackers=[tensorbaord]"),
                   "'pretrain.train.trackers[0]'", "did you mean 'tensorboard'?")
