"""NLVR2 (three settings), SNLI-VE, RefCOCO and GQA through the CLI, from corpora read from
their released formats (conftest.write_task_sources); the official scores of result files on
hand-checked cases; the best checkpoint kept beside the last."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, one_error_line, tiny_recipe_obj, tiny_recipe_sets

SETS = [a for x in tiny_recipe_sets() for a in ("--set", x)]


@pytest.fixture(scope="module")
def pretrained(task_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "pre"
    res = cli("pretrain", "recipes/tiny.yaml", "-c", task_data["corpus"], "-f",
              task_data["features"], "-o", out, *SETS)
    assert res.exit_code == 0, res.output
    return out


def _finetune_and_evaluate(task: str, pretrained: Path, data: dict, out: Path,
                           *extra: str) -> tuple[dict, Path]:
    io_ = ["-c", data["corpus"], "-f", data["features"]]
    res = cli("finetune", task, "-k", pretrained, *io_, "-o", out / "ft", *SETS, *extra)
    assert res.exit_code == 0, res.output
    res = cli("evaluate", task, "-k", out / "ft", *io_, "-o", out / "ev")
    assert res.exit_code == 0, res.output
    return json.loads((out / "ev" / "metrics.json").read_text()), out / "ev"


@pytest.mark.parametrize("setting", ["pair", "pair-biattn", "triplet"])
def test_nlvr2_settings_finetune_evaluate_and_score_their_csv(
        setting: str, pretrained: Path, task_data: dict, tmp_path: Path) -> None:
    metrics, ev = _finetune_and_evaluate("nlvr2", pretrained, task_data, tmp_path, "--set",
                                         f"nlvr2.setting={setting}")
    assert metrics["pairs"] == 2 and 0 <= metrics["accuracy"] <= 100
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["heads"][0]["kind"] == {"pair": "pair", "pair-biattn": "pair_attn",
                                          "triplet": "linear"}[setting]
    # The second image's regions are of type 2 in every setting (UNITER's use_img_type).
    assert config["bert"]["type_vocab_size"] == 3
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["tasks"]["nlvr2"] == ({"setting": setting, "tag_types": True}
                                      if setting == "triplet" else
                                      {"setting": setting, "image_types": True})
    # The paired-attention head never reads the pooled [CLS]: its pooler is frozen (not left
    # trainable without a gradient, which DDP refuses), so its weights stay the pre-trained.
    from safetensors.torch import load_file

    from vlp_cli.tasks import get

    task = get("nlvr2").bind(tiny_recipe_obj(), meta["tasks"]["nlvr2"])
    assert task.uses_pooler == (setting != "pair-biattn")

    pre, ft = load_file(pretrained / "model.safetensors"), load_file(tmp_path / "ft" /
                                                                       "model.safetensors")
    same = torch.equal(pre["bert.pooler.dense.weight"], ft["bert.pooler.dense.weight"])
    assert same == (setting == "pair-biattn")
    csv = (ev / "nlvr2_predictions.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in csv) == ["test1-10-0-0", "test1-11-0-1"]
    res = cli("evaluate", "nlvr2", "--predictions", ev / "nlvr2_predictions.csv",
              "--references", task_data["root"] / "nlvr2" / "test1.json", "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    # The best held-out checkpoint sits beside the last one, a complete checkpoint.
    best = json.loads((tmp_path / "ft" / "best" / "meta.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["acc"]) for r in rows if r["split"] == "val" and r["step"] > 0]
    top = max(v for _, v in val)
    assert best["best"] == {"metric": "val acc", "value": pytest.approx(top)}
    assert best["step"] == min(s for s, v in val if v == top)  # the first to reach it
    assert cli("verify", tmp_path / "ft" / "best").exit_code == 0


def test_nlvr2_accuracy_and_consistency_as_the_official_script(tmp_path: Path) -> None:
    """Hand-checked: statement dev-1-*-0 has both pairs right, dev-1-*-1 one of two, dev-2-*-0
    none of one: accuracy 3/5, consistency 1/3."""
    lines = [("dev-1-0-0", "True", "True"), ("dev-1-1-0", "False", "False"),
             ("dev-1-0-1", "True", "True"), ("dev-1-1-1", "True", "False"),
             ("dev-2-0-0", "False", "True")]
    (tmp_path / "dev.json").write_text("".join(json.dumps(
        {"identifier": i, "sentence": "s", "label": lab, "left_url": "l"}) + "\n"
        for i, lab, _ in lines))
    (tmp_path / "pred.csv").write_text("".join(f"{i},{p}\n" for i, _, p in lines))
    res = cli("evaluate", "nlvr2", "--predictions", tmp_path / "pred.csv", "--references",
              tmp_path / "dev.json", "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(60.0) and m["consistency"] == pytest.approx(100 / 3)
    assert m["statements"] == 3
    (tmp_path / "short.csv").write_text("dev-1-0-0,True\n")
    err = one_error_line(cli("evaluate", "nlvr2", "--predictions", tmp_path / "short.csv",
                             "--references", tmp_path / "dev.json", "-o", tmp_path / "t"))
    assert "dev-1-1-0" in err


def test_snli_ve_finetunes_evaluates_and_scores(pretrained: Path, task_data: dict,
                                                tmp_path: Path) -> None:
    metrics, ev = _finetune_and_evaluate("snli-ve", pretrained, task_data, tmp_path)
    assert metrics["hypotheses"] == 3
    rows = json.loads((ev / "snli_ve_results.json").read_text())
    res = cli("evaluate", "snli-ve", "--predictions", ev / "snli_ve_results.json",
              "--references", task_data["root"] / "snli_ve_test.jsonl", "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    # Hand-checked: flip one prediction of three known-right ones.
    gold = [json.loads(x) for x in (task_data["root"] / "snli_ve_test.jsonl").read_text()
            .splitlines()]
    rows = [{"pairID": g["pairID"], "gold_label": g["gold_label"]} for g in gold]
    rows[0]["gold_label"] = "neutral" if gold[0]["gold_label"] != "neutral" else "entailment"
    (tmp_path / "p.json").write_text(json.dumps(rows))
    res = cli("evaluate", "snli-ve", "--predictions", tmp_path / "p.json", "--references",
              task_data["root"] / "snli_ve_test.jsonl", "-o", tmp_path / "h")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(200 / 3)
    # metrics.json names what was evaluated: the fingerprints of the checkpoint, corpus,
    # features and recipe, and what the checkpoint was fine-tuned from
    assert metrics["init_task"] == "pretrain" and metrics["init"] == str(pretrained.resolve())
    assert set(metrics["fingerprints"]) == {"checkpoint", "corpus", "features", "recipe"}
    assert all(metrics["fingerprints"].values()), metrics["fingerprints"]
    # NLVR2 from this SNLI-VE fine-tuning (as make demo-tasks runs it): the learning table
    # says so
    nlvr2, _ = _finetune_and_evaluate("nlvr2", tmp_path / "ft", task_data, tmp_path / "n")
    assert nlvr2["init_task"] == "snli-ve"
    assert nlvr2["fingerprints"]["checkpoint"] != metrics["fingerprints"]["checkpoint"]
    from vlp_cli.stages.report import learning_rows

    rows = learning_rows([nlvr2, metrics, {"task": "nlvr2", "predictions": "m.csv",
                                           "accuracy": 50.0},
                          {"task": "snli-ve", "predictions": "m.json", "accuracy": 50.0}])
    assert {r["task"]: r["from"] for r in rows} == {"nlvr2": "snli-ve", "snli-ve": None}
    for name, m in (("n", nlvr2), ("m", {"task": "nlvr2", "predictions": "m.csv",
                                         "accuracy": 50.0})):
        (tmp_path / "r" / name).mkdir(parents=True)
        (tmp_path / "r" / name / "metrics.json").write_text(json.dumps(m))
    res = cli("report", tmp_path / "r")
    assert res.exit_code == 0 and "nlvr2*" in res.output, res.output
    assert "nlvr2: fine-tuned from the snli-ve fine-tuning" in res.output, res.output


def test_refcoco_finetunes_evaluates_and_scores_by_iou(pretrained: Path, task_data: dict,
                                                        tmp_path: Path) -> None:
    metrics, ev = _finetune_and_evaluate("refcoco", pretrained, task_data, tmp_path)
    # Test: refs 9 (testA), 10 (testB), 11 (testA), two sentences each; the store holds the
    # ground-truth box among the regions, so the upper bound is 100.
    assert metrics["sentences"] == 6 and metrics["upper_bound"] == pytest.approx(100.0)
    assert {"accuracy_testA", "accuracy_testB"} <= set(metrics)
    refs = task_data["root"] / "refcoco" / "refs(unc).p"
    # The whole refs file holds train and val sentences too: a test results file is partial.
    res = cli("evaluate", "refcoco", "--predictions", ev / "refcoco_results.json",
              "--references", refs, "-o", tmp_path / "s0")
    assert "test=refs(unc).p" in one_error_line(res)
    res = cli("evaluate", "refcoco", "--predictions", ev / "refcoco_results.json",
              "--references", f"test={refs}", "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    # Hand-checked IoU: the true box, one shifted by half its width (IoU 1/3), one inside.
    inst = json.loads((task_data["root"] / "refcoco" / "instances.json").read_text())
    box = {a["id"]: a["bbox"] for a in inst["annotations"]}
    x, y, w, h = box[109]
    rows = [{"sent_id": 18, "box": [x, y, w, h]}, {"sent_id": 19, "box": [x + w / 2, y, w, h]}]
    rows += [{"sent_id": 2 * k + j, "box": box[100 + k]} for k in (10, 11) for j in (0, 1)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    res = cli("evaluate", "refcoco", "--predictions", tmp_path / "p.json", "--references",
              f"test={refs}", "-o", tmp_path / "h")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(500 / 6) and m["sentences"] == 6
    assert m["accuracy_testB"] == pytest.approx(100.0) and m["accuracy_testA"] == \
        pytest.approx(75.0)
    rows = [json.loads(x) for x in (tmp_path / "h" / "predictions.jsonl").read_text()
            .splitlines()]
    assert [r["iou"] for r in rows] == pytest.approx([1.0, 1 / 3, 1.0, 1.0, 1.0, 1.0])


def test_gqa_finetunes_and_writes_its_submission_format(pretrained: Path, task_data: dict,
                                                        tmp_path: Path) -> None:
    metrics, ev = _finetune_and_evaluate("gqa", pretrained, task_data, tmp_path)
    rows = json.loads((ev / "gqa_results.json").read_text())
    assert metrics["questions"] == len(rows) == 12
    assert set(rows[0]) == {"questionId", "prediction"}


def test_answers_at_a_mask_keep_the_pretrained_masked_token_head(pretrained: Path,
                                                                   task_data: dict,
                                                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file

    metrics, ev = _finetune_and_evaluate("gqa", pretrained, task_data, tmp_path, "--set",
                                         "gqa.classifier=masked_tokens")
    assert metrics["questions"] == 12 and 0 <= metrics["accuracy"] <= 100
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert [(h["name"], h["kind"]) for h in config["heads"]] == [("mlm", "masked_tokens")]
    state = json.loads((tmp_path / "ft" / "meta.json").read_text())["tasks"]["gqa"]
    assert len(state["answer_pieces"]) == len(state["answers"]) > 1
    # The head starts from the pre-training's (a fresh one would be uncorrelated with it).
    key = "heads.mlm.dense.weight"
    a = load_file(str(pretrained / "model.safetensors"))[key].flatten()
    b = load_file(str(tmp_path / "ft" / "model.safetensors"))[key].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    # The checkpoint, not the recipe, says how it answers.
    res = cli("evaluate", "gqa", "-k", tmp_path / "ft", "-c", task_data["corpus"], "-f",
              task_data["features"], "-o", tmp_path / "ev2", "--set", "gqa.classifier=mlp")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


def test_vlp_answer_reads_a_masked_checkpoint_as_evaluation_does(
        pretrained: Path, task_data: dict, tmp_path: Path) -> None:
    """`vlp answer` (Predictor.answer -> Vqa.answer) on a checkpoint that answers at a [MASK]
    gives evaluation's answers, with scores that share one unit among the answers."""
    from vlp_cli.stages.common import open_checkpoint_inputs
    from vlp_cli.tasks import get

    _finetune_and_evaluate("vqa", pretrained, task_data, tmp_path, "--set",
                           "vqa.classifier=masked_tokens")
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text()
             .splitlines()]
    o = open_checkpoint_inputs(tmp_path / "ft", task_data["corpus"], task_data["features"])
    task = get("vqa").bind(tiny_recipe_obj(), get("vqa").state_from_meta(o.meta))
    assert task.masked
    from vlp_cli.data.examples import ExampleBuilder

    builder = ExampleBuilder(o.tokenizer, o.features, tiny_recipe_obj().data)
    got = task.answer(o.model, builder, [builder.regions(p["image"]) for p in preds],
                      [p["question"] for p in preds], o.tokenizer, torch.device("cpu"),
                      top=len(task.state["answers"]))
    assert [g[0][0] for g in got] == [p["prediction"] for p in preds]
    assert all(sum(s for _, s in g) == pytest.approx(1.0, abs=1e-4) for g in got)


def test_the_mask_survives_truncation() -> None:
    from vlp_cli.tasks.vqa import question_text

    class B:  # the parts of an ExampleBuilder that `text` reads
        cls_id, sep_id, mask_id = 1, 2, 3

        def text(self, words, tags, max_len):
            from vlp_cli.data.examples import ExampleBuilder

            return ExampleBuilder.text(self, words, tags, max_len)

    text, at = question_text(B(), list(range(10, 30)), list(range(40, 50)), 16, True)
    assert len(text.ids) == 16 and text.ids[at] == 3 and text.ids[at + 1] == 2
    text, at = question_text(B(), list(range(10, 30)), [], 8, True)
    assert text.ids == [1, 10, 11, 12, 13, 14, 3, 2] and at == 6
    text, at = question_text(B(), [10, 11], [40], 16, False)
    assert at == 0 and 3 not in text.ids


def test_gqa_results_score_exact_match_per_structural_type(tmp_path: Path) -> None:
    questions = {"1": {"question": "q", "imageId": "1", "answer": "yes",
                       "types": {"structural": "verify"}},
                 "2": {"question": "q", "imageId": "1", "answer": "left",
                       "types": {"structural": "query"}},
                 "3": {"question": "q", "imageId": "1", "answer": "no",
                       "types": {"structural": "verify"}}}
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps(questions))
    (tmp_path / "p.json").write_text(json.dumps([
        {"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "right"},
        {"questionId": "3", "prediction": "yes"}]))
    res = cli("evaluate", "gqa", "--predictions", tmp_path / "p.json", "--references",
              tmp_path / "val_balanced_questions.json", "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(100 / 3)
    assert m["verify"] == pytest.approx(50.0) and m["query"] == pytest.approx(0.0)


def test_pair_attention_head_ignores_padding_and_reads_both_sides() -> None:
    from vlp_cli.model import HeadSpec, VLPModel

    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, [HeadSpec("p", "pair_attn", 2)],
                                       vocab_size=100).eval()
    h = model.bert_config.hidden_size
    hidden = torch.randn(2, 6, h)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    a = model.pair_logits("p", hidden, valid)
    noisy = hidden.clone()
    noisy[1, 4:] = 100.0  # padding of the right side: must not matter
    assert torch.allclose(a, model.pair_logits("p", noisy, valid), atol=1e-5)
    changed = hidden.clone()
    changed[1, 0] += 1.0  # a valid right position: must
    assert not torch.allclose(a, model.pair_logits("p", changed, valid))


@pytest.mark.parametrize("state", [{"setting": "pair", "image_types": True},
                                   {"setting": "pair"}, {"setting": "triplet"},
                                   {"setting": "triplet", "tag_types": True}])
def test_nlvr2_second_image_is_type_2_unless_an_old_pair_checkpoint(
        state: dict, task_data: dict) -> None:
    """UNITER's code gives the second image token type 2 in the pair settings too; a pair
    checkpoint from before (no "image_types" in its state) keeps type 1 for both."""
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.datasets import Collator
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore
    from vlp_cli.tasks import Context, get

    recipe = tiny_recipe_obj()
    tok = load_tokenizer("embedded:minilm")
    builder = ExampleBuilder(tok, FeatureStore(task_data["features"]), recipe.data)
    ctx = Context(recipe, Corpus(task_data["corpus"]), builder, tok)
    task = get("nlvr2").bind(recipe, state)
    ds = task.dataset(ctx, "train", 0)
    batch = Collator(ctx.builder.pad_id, task.collate)([ds[0], ds[1]])
    types = batch["img_type_ids"][batch["img_mask"].bool()] if "img_type_ids" in batch else None
    if state == {"setting": "pair"}:
        assert types is None
    elif state["setting"] == "pair":  # rows: (statement 0, left), (0, right), (1, left), ...
        rows = batch["img_type_ids"].masked_fill(~batch["img_mask"].bool(), 0)
        assert [set(r.tolist()) - {0} for r in rows] == [{1}, {2}, {1}, {2}]
    else:
        assert set(types.tolist()) == {1, 2}
        # The tags: one list of type 1 (a triplet checkpoint from before), or each image's
        # in order, the second's of type 2 as its regions.
        ids, text_types = np.array(ds[0]["ids"]), np.array(ds[0]["types"])
        tag_types = text_types[(ids != builder.sep_id) & (text_types > 0)]
        ex = ctx.corpus.get(int(ds.indices[0]))
        left, right = (len(builder.tag_ids(builder.regions(k).tag_classes))
                       for k in ex["images"][:2])
        assert left > 0 and right > 0
        if state.get("tag_types"):
            assert tag_types.tolist() == [1] * left + [2] * right
        else:
            assert set(tag_types.tolist()) == {1}


def test_triplet_type_embedding_starts_as_the_image_type() -> None:
    from vlp_cli.model import VLPModel

    model = VLPModel.from_text_encoder("random:tiny", 16, [], vocab_size=100)
    before = model.bert.embeddings.token_type_embeddings.weight.detach().clone()
    model.grow_type_vocab(3)
    after = model.bert.embeddings.token_type_embeddings.weight
    assert after.shape[0] == 3 and model.config.bert["type_vocab_size"] == 3
    assert torch.equal(after[:2], before) and torch.equal(after[2], before[1])


def test_iou_of_boxes() -> None:
    from vlp_cli.tasks.refcoco import iou_xyxy

    got = iou_xyxy(np.array([[0, 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6]]), np.array([0, 0, 2, 2]))
    assert got == pytest.approx([1.0, 1 / 3, 0.0])


def test_vcr_reader_writes_region_references_as_named_objects(tmp_path: Path) -> None:
    from vlp_cli.readers import reader_for, vcr

    path = Path(__file__).parent / "fixtures" / "vcr" / "val.jsonl"
    assert reader_for(str(path)) is vcr
    exs = vcr.read(str(path), tmp_path)
    assert [e["split"] for e in exs] == ["val", "val"]
    first = exs[0]
    assert first["images"] == ["lsmdc_1054_Harry_Potter_and_the_prisoner_of_azkaban/1054_Harry_"
                               "Potter_and_the_prisoner_of_azkaban_00.01.46.736-00.01.50.168@0.jpg"]
    assert first["texts"][1] == "What is person0 doing?"
    assert first["texts"][2:6][2] == "person0 and person1 are dancing."
    assert first["texts"][6 + 2] == "person0 is sitting on horse2 and holding its reins."
    # The second-stage pre-training text: question, right answer, right rationale.
    assert first["texts"][0] == ("What is person0 doing? person0 is riding the horse. person0 "
                                 "is sitting on horse2 and holding its reins.")
    assert first["label"] == {"answer": 0, "rationale": 2} and first["id"] == "val-0"
    assert exs[1]["texts"][1] == "How do person0 and person1 know each other?"
    bad = json.loads(path.read_text().splitlines()[0])
    bad["question"] = ["What", "is", [7], "doing", "?"]
    (tmp_path / "val.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(Exception, match=r"line 1 question: token \[7\]"):
        vcr.read(str(tmp_path / "val.jsonl"), tmp_path)


def test_vcr_finetunes_evaluates_and_scores(pretrained: Path, task_data: dict,
                                            tmp_path: Path) -> None:
    metrics, ev = _finetune_and_evaluate("vcr", pretrained, task_data, tmp_path)
    assert metrics["questions"] == 2
    rows = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    assert all(sum(r["answer_probs"]) == pytest.approx(1.0, abs=1e-4) for r in rows)
    both = np.mean([r["answer_pred"] == r["answer"] and r["rationale_pred"] == r["rationale"]
                    for r in rows])
    assert metrics["q_ar"] == pytest.approx(100 * both)
    # Both results files, the leaderboard's CSV (the rationales given each answer, of which
    # the scoring reads the right answer's) too, score to the same figures.
    lines = (ev / "vcr_leaderboard.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].split(",")[:2] == ["annot_id", "answer_0"]
    assert len(lines[0].split(",")) == 21 and lines[0].endswith("rationale_conditioned_on_a3_3")
    for r in rows:
        assert r["rationale_probs"] == r["rationale_probs_given"][r["answer"]]
    for name in ("vcr_results.json", "vcr_leaderboard.csv"):
        res = cli("evaluate", "vcr", "--predictions", ev / name, "--references",
                  task_data["root"] / "vcr" / "heldout.jsonl", "-o", tmp_path / name)
        assert res.exit_code == 0, res.output
        again = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {k: again[k] for k in ("q_a", "qa_r", "q_ar")} == \
            {k: pytest.approx(metrics[k]) for k in ("q_a", "qa_r", "q_ar")}
    # VCR's test file has no labels: its questions are predicted, written for the
    # leaderboard, and not scored.
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text("".join(
        json.dumps({k: v for k, v in json.loads(x).items()
                    if k not in ("answer_label", "rationale_label")}) + "\n"
        for x in (task_data["root"] / "vcr" / "heldout.jsonl").read_text().splitlines()))
    res = cli("build-corpus", task_data["root"] / "vcr" / "train.jsonl", unlabelled, "-f",
              task_data["features"], "-o", tmp_path / "tc", *SETS)
    assert res.exit_code == 0, res.output
    res = cli("evaluate", "vcr", "-k", tmp_path / "ft", "-c", tmp_path / "tc", "-f",
              task_data["features"], "-o", tmp_path / "tev")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "tev" / "metrics.json").read_text())
    assert m["questions"] == 2 and m["q_ar"] is None
    assert len((tmp_path / "tev" / "vcr_leaderboard.csv").read_text().splitlines()) == 3


def test_vcr_scores_hand_checked(tmp_path: Path) -> None:
    """val-0: answer right (0), rationale wrong; val-1: both right (1, 0)."""
    path = Path(__file__).parent / "fixtures" / "vcr" / "val.jsonl"
    (tmp_path / "p.json").write_text(json.dumps([
        {"annot_id": "val-0", "answer_probs": [0.7, 0.1, 0.1, 0.1],
         "rationale_probs": [0.4, 0.3, 0.2, 0.1]},
        {"annot_id": "val-1", "answer_probs": [0.1, 0.6, 0.2, 0.1],
         "rationale_probs": [0.5, 0.3, 0.1, 0.1]}]))
    res = cli("evaluate", "vcr", "--predictions", tmp_path / "p.json", "--references", path,
              "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert (m["q_a"], m["qa_r"], m["q_ar"]) == (100.0, 50.0, 50.0)
    # The leaderboard's CSV: only the rationale columns given the right answer count
    # (val-0's given answer 0 pick rationale 0, wrong; val-1's given answer 1 pick 0, right,
    # while its columns given answer 0 would pick 3).
    header = ["annot_id", *(f"answer_{j}" for j in range(4)),
              *(f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4))]
    one_hot = {0: [.7, .1, .1, .1], 1: [.1, .7, .1, .1], 3: [.1, .1, .1, .7]}
    rows = [["val-0", *one_hot[0], *one_hot[0], *one_hot[1], *one_hot[1], *one_hot[1]],
            ["val-1", *one_hot[1], *one_hot[3], *one_hot[0], *one_hot[3], *one_hot[3]]]
    (tmp_path / "board.csv").write_text("\n".join(",".join(map(str, r))
                                                  for r in [header, *rows]) + "\n")
    res = cli("evaluate", "vcr", "--predictions", tmp_path / "board.csv", "--references", path,
              "-o", tmp_path / "b")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (m["q_a"], m["qa_r"], m["q_ar"]) == (100.0, 50.0, 50.0)
    (tmp_path / "bad.csv").write_text("annot_id,answer_0\nval-0,1\n")
    err = one_error_line(cli("evaluate", "vcr", "--predictions", tmp_path / "bad.csv",
                             "--references", path, "-o", tmp_path / "c"))
    assert "answer_1" in err and "leaderboard" in err


def test_vcr_second_stage_pretraining_on_its_text(pretrained: Path, task_data: dict,
                                                  tmp_path: Path) -> None:
    """UNITER's second stage: from the first stage's checkpoint (`model.init`), the masked
    objectives read the VCR questions with their right answer and rationale (kind "vcr")."""
    from safetensors.torch import load_file

    res = cli("pretrain", "recipes/tiny.yaml", "-c", task_data["corpus"], "-f",
              task_data["features"], "-o", tmp_path / "pre2", *SETS, "--set",
              "pretrain.tasks={mlm: 1, mrfr: 1, mrckl: 1}", "--set", "mlm.text=[vcr]",
              "--set", "mrfr.text=[vcr]", "--set", "mrckl.text=[vcr]", "--set",
              f"model.init={pretrained}", "--set", "seed=7")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "pre2" / "meta.json").read_text())
    assert meta["init"] == str(pretrained)
    # The encoder goes on from the first stage (a fresh start, from another seed, would share
    # nothing with it).
    key = "bert.encoder.layer.0.attention.self.query.weight"
    first = load_file(str(pretrained / "model.safetensors"))[key].flatten()
    second = load_file(str(tmp_path / "pre2" / "model.safetensors"))[key].flatten()
    assert torch.corrcoef(torch.stack([first, second]))[0, 1] > 0.9
    rows = [json.loads(x) for x in (tmp_path / "pre2" / "metrics.jsonl").read_text()
            .splitlines()]
    held = [r for r in rows if r["split"] == "val"][-1]
    assert {k.split("/")[0] for k in held if "/" in k} == {"mlm", "mrfr", "mrckl"}, held
    # A first stage that read other position numbers than the recipe gives: one line.
    err = one_error_line(cli("pretrain", "recipes/tiny.yaml", "-c", task_data["corpus"], "-f",
                             task_data["features"], "-o", tmp_path / "pre3", *SETS, "--set",
                             f"model.init={pretrained}", "--set", "data.pos_kind=oscar6"))
    assert "model.init" in err and "data.pos_kind" in err and "7 position numbers" in err
    assert not (tmp_path / "pre3" / "model.safetensors").exists()


def test_mistakes_in_scoring_and_settings_are_one_line(task_data: dict, tmp_path: Path) -> None:
    """What a new user tried (a review of this session's tasks): each is one clear line."""
    root = task_data["root"]
    (tmp_path / "p.csv").write_text("test1-10-0-0,1\ntest1-11-0-1,0\n")
    err = one_error_line(cli("evaluate", "nlvr2", "--predictions", tmp_path / "p.csv",
                             "--references", root / "nlvr2" / "test1.json", "-o", tmp_path / "a"))
    assert "line 1" in err and "True" in err
    (tmp_path / "p.json").write_text("[]")
    err = one_error_line(cli("evaluate", "nlvr2", "--predictions", tmp_path / "p.json",
                             "--references", root / "nlvr2" / "test1.json", "-o", tmp_path / "b"))
    assert "JSON" in err and "CSV" in err
    err = one_error_line(cli("evaluate", "refcoco", "--predictions", tmp_path / "p.json",
                             "--references", root / "refcoco" / "instances.json", "-o",
                             tmp_path / "c"))
    assert "refs(unc).p" in err
    unlabelled = [json.loads(x) for x in (root / "vcr" / "val.jsonl").read_text().splitlines()]
    for q in unlabelled:
        q.pop("answer_label"), q.pop("rationale_label")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in unlabelled))
    (tmp_path / "v.json").write_text(json.dumps([{"annot_id": "val-7", "answer_probs": [1, 0, 0, 0],
                                                  "rationale_probs": [1, 0, 0, 0]}]))
    err = one_error_line(cli("evaluate", "vcr", "--predictions", tmp_path / "v.json",
                             "--references", tmp_path / "test.jsonl", "-o", tmp_path / "d"))
    assert "no labels" in err
    err = one_error_line(cli("build-corpus", str(root / "data.jsonl"), "--features",
                             task_data["features"], "--out", tmp_path / "e", "--set",
                             "corpus.image_keys={lower}.npz"))
    assert "not valid YAML" in err and "quote" in err


def test_architecture_keys_a_checkpoint_fixes_are_named_not_silently_dropped(
        pretrained: Path, task_data: dict, tmp_path: Path) -> None:
    io_ = ["-c", task_data["corpus"], "-f", task_data["features"]]
    res = cli("finetune", "snli-ve", "-k", pretrained, *io_, "-o", tmp_path / "ft", *SETS,
              "--set", "model.pos_fourier=3", "--set", "model.img_dropout=0.25")
    assert res.exit_code == 0, res.output
    assert "model.pos_fourier 3 is not used" in " ".join(res.output.split()), res.output
    # the regions' dropout is a training setting: applied, and saved with the fine-tuning
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["img_dropout"] == 0.25
