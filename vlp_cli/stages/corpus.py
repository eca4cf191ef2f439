"""vlp build-corpus: captions / questions + a feature store -> a tokenised corpus store.

Input rules: a blank caption or question is dropped (and counted), never trained on; a
question needs at least one answer; test answers outside the answer vocabulary (which can
only score 0) are counted; moving train images to val is logged with the key that does it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.checkpoint import load_tokenizer, tokenizer_identity
from vlp_cli.config import CorpusCfg, Recipe, save_recipe
from vlp_cli.console import progress
from vlp_cli.data.jsonl import iter_jsonl
from vlp_cli.stores.corpus import SPLITS, CorpusWriter
from vlp_cli.stores.features import FeatureStore

logger = logging.getLogger(__name__)


def easy_vqa_examples(workdir: Path) -> list[dict]:
    """Captions (derived from the pixels) and questions of the embedded easy-VQA data.

    Writes the derived annotations and their agreement with the questions into `workdir`.
    """
    from vlp_cli.data import easyvqa

    examples: list[dict] = []
    reports = {}
    with (workdir / "easy-vqa-annotations.jsonl").open("w", encoding="utf-8") as f:
        for split in ("train", "test"):
            anns = easyvqa.derive_annotations(split)
            questions = easyvqa.load_questions(split)
            report = easyvqa.check_against_questions(anns, questions)
            reports[split] = report.summary()
            logger.info("easy-VQA %s: %s", split, report.summary())
            by_id = {a.image_id: a for a in anns}
            for a in anns:
                f.write(json.dumps({"image": a.key, "box": a.box, "color": a.color,
                                    "shape": a.shape, "size": a.size, "position": a.position,
                                    "caption": a.caption}) + "\n")
                examples.append({"kind": "caption", "split": split, "image": a.key,
                                 "text": a.caption, "source": "easy-vqa"})
            for n, (q, ans, image_id) in enumerate(zip(*questions)):
                examples.append({"kind": "vqa", "split": split, "image": by_id[image_id].key,
                                 "text": q, "answers": [ans], "qid": f"{split}-{n}",
                                 "source": "easy-vqa"})
    (workdir / "easy-vqa-agreement.json").write_text(json.dumps(reports, indent=2))
    return examples


def _split_spec(spec: str) -> tuple[str | None, Path]:
    """(split or None, file) of `[SPLIT=]FILE`; a file whose own name holds '=' also works."""
    if "=" in spec and not Path(spec).is_file():
        split, path_s = spec.split("=", 1)
        if split in SPLITS:
            return split, Path(path_s)
        if split and not any(c in split for c in "/\\."):
            raise VlpError(f"unknown split {split!r} in {spec!r}: use train, val or test")
    path = Path(spec)
    if not path.is_file():
        raise VlpError(f"source {spec!r}: not 'easy-vqa' and not an existing JSONL file")
    return None, path


def jsonl_examples(spec: str) -> list[dict]:
    """`[SPLIT=]FILE.jsonl` with captions `{"image", "caption"}` or questions
    `{"image", "question", "answers": [...]}`; a line's own "split" field wins.

    Blank captions and questions are dropped with a logged count.
    """
    split, path = _split_spec(spec)
    if not path.is_file():
        raise VlpError(f"source {spec!r}: {path} is not an existing JSONL file")
    out = []
    blank = 0
    for where, rec in iter_jsonl(path, "source"):
        s = rec.get("split", split or "train")
        if s not in SPLITS:
            raise VlpError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {s!r}")
        base = {"split": s, "image": rec["image"], "where": where}
        if isinstance(rec.get("caption"), str):
            if not rec["caption"].strip():
                blank += 1
                continue
            out.append({**base, "kind": "caption", "text": rec["caption"].strip()})
        elif isinstance(rec.get("question"), str):
            answers = rec.get("answers")
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise VlpError(f"{where}: 'answers' must be a list of strings "
                               "(ten for VQA v2, one for single-answer sets)")
            if not answers:
                raise VlpError(f"{where}: 'answers' is empty: give at least one answer (ten "
                               "for VQA v2, one for single-answer sets)")
            if not rec["question"].strip():
                blank += 1
                continue
            out.append({**base, "kind": "vqa", "text": rec["question"].strip(),
                        "answers": answers,
                        "qid": rec.get("question_id", f"{path.stem}-{where.rsplit(' ', 1)[-1]}")})
        else:
            raise VlpError(f"{where}: needs a 'caption' or 'question' field (a string)")
    if blank:
        logger.warning("%s: %d blank captions or questions dropped", path, blank)
    return out


def carve_val(examples: list[dict], cfg: CorpusCfg) -> tuple[int, int]:
    """When no example is in 'val', move a fraction of the train images (all their examples)
    there: held-out numbers never see a training image. Returns (images, examples) moved."""
    if any(e["split"] == "val" for e in examples) or cfg.val_fraction <= 0:
        return 0, 0
    train_images = sorted({e["image"] for e in examples if e["split"] == "train"})
    rng = np.random.default_rng(cfg.seed)
    n = int(round(len(train_images) * cfg.val_fraction))
    val = set(rng.choice(train_images, size=n, replace=False).tolist()) if n else set()
    moved = 0
    for e in examples:
        if e["split"] == "train" and e["image"] in val:
            e["split"] = "val"
            moved += 1
    if n:
        logger.info("no 'val' split given: moved %d of %d train images (%d examples) to val "
                    "(corpus.val_fraction=%g; set it to 0 to keep them in train)", n,
                    len(train_images), moved, cfg.val_fraction)
    return n, moved


def warn_unscorable(examples: list[dict], answers: list[str]) -> int:
    """Count (and log) test questions none of whose answers is in the vocabulary: whatever
    the model answers, they score 0."""
    vocab = set(answers)
    test = [e for e in examples if e["kind"] == "vqa" and e["split"] == "test"]
    lost = [e for e in test if not vocab.intersection(e["answers"])]
    if lost:
        outside = {a for e in test for a in e["answers"] if a not in vocab}
        logger.warning("%d of %d test questions have no answer in the %d-answer vocabulary "
                       "(%d distinct test answers are outside it): they score 0 whatever the "
                       "model answers", len(lost), len(test), len(answers), len(outside))
    return len(lost)


def run(sources: list[str], features: Path, out: Path, recipe: Recipe,
        skip_missing: bool = False, allow_incomplete: bool = False) -> Path:
    """Build a corpus from `sources` (`easy-vqa` or `[SPLIT=]FILE.jsonl`, any number).

    A feature store whose extraction has not finished is refused unless `allow_incomplete`.
    """
    cfg = recipe.corpus
    store = FeatureStore(features, allow_incomplete=allow_incomplete)
    tok = load_tokenizer(cfg.tokenizer)
    writer = CorpusWriter(out, {})
    try:
        return _build(sources, store, tok, writer, features, out, recipe, skip_missing)
    except BaseException:
        writer.abort()
        raise


def _build(sources: list[str], store: FeatureStore, tok: object, writer: CorpusWriter,
           features: Path, out: Path, recipe: Recipe, skip_missing: bool) -> Path:
    from vlp_cli.metrics import build_answer_vocab, vqa_target_scores

    cfg = recipe.corpus
    examples: list[dict] = []
    for spec in sources:
        examples += easy_vqa_examples(writer.workdir) if spec == "easy-vqa" else \
            jsonl_examples(spec)
    if not examples:
        raise VlpError("no examples in the given sources")
    keys = set(store.keys())
    missing = [e for e in examples if e["image"] not in keys]
    if missing:
        first = missing[0]
        msg = (f"{len(missing)} examples name images absent from {features}; first: "
               f"{first.get('where', first.get('source', ''))} image {first['image']!r}")
        if not skip_missing:
            raise VlpError(msg + " (extract their features, or pass --skip-missing)")
        logger.warning(msg + "; skipped")
        examples = [e for e in examples if e["image"] in keys]
    carve_val(examples, cfg)

    answers = build_answer_vocab(
        (e["answers"] for e in examples if e["kind"] == "vqa" and e["split"] != "test"),
        max_size=cfg.max_answers)
    warn_unscorable(examples, answers)
    answer_index = {a: i for i, a in enumerate(answers)}
    with progress() as bar:
        task = bar.add_task("tokenise", total=len(examples))
        for start in range(0, len(examples), 1024):
            chunk = examples[start: start + 1024]
            ids = tok([e["text"] for e in chunk], add_special_tokens=False)["input_ids"]
            for e, ii in zip(chunk, ids):
                e.pop("where", None)
                e["ids"] = ii
                if e["kind"] == "vqa":
                    scores = vqa_target_scores(e["answers"])
                    kept = [(answer_index[a], s) for a, s in scores.items() if a in answer_index]
                    e["labels"] = [a for a, _ in kept]
                    e["scores"] = [s for _, s in kept]
                writer.add(e)
            bar.advance(task, len(chunk))
    save_recipe(recipe, writer.workdir)
    meta = writer.close(
        sources=sources, tokenizer=tokenizer_identity(tok),
        features={"path": str(Path(features).resolve()), "fingerprint": store.fingerprint,
                  "feature_dim": store.feature_dim},
        answers=answers,
    )
    logger.info("%s: %d examples (%s), %d answers", out, meta["examples"],
                ", ".join(f"{k} {v}" for k, v in meta["counts"].items()), len(answers))
    return Path(out)
