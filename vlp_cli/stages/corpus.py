"""vlp build-corpus: captions / questions + a feature store -> a tokenised corpus store."""

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


def jsonl_examples(spec: str) -> list[dict]:
    """`[SPLIT=]FILE.jsonl` with captions `{"image", "caption"}` or questions
    `{"image", "question", "answers": [...]}`; a line's own "split" field wins."""
    split = None
    path_s = spec
    if "=" in spec and spec.split("=", 1)[0] in SPLITS:
        split, path_s = spec.split("=", 1)
    path = Path(path_s)
    if not path.is_file():
        raise VlpError(f"source {spec!r}: not 'easy-vqa' and not an existing JSONL file")
    out = []
    for where, rec in iter_jsonl(path, "source"):
        s = rec.get("split", split or "train")
        if s not in SPLITS:
            raise VlpError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {s!r}")
        base = {"split": s, "image": rec["image"], "where": where}
        if isinstance(rec.get("caption"), str) and rec["caption"].strip():
            out.append({**base, "kind": "caption", "text": rec["caption"].strip()})
        elif isinstance(rec.get("question"), str) and rec["question"].strip():
            answers = rec.get("answers")
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise VlpError(f"{where}: 'answers' must be a list of strings "
                               "(ten for VQA v2, one for single-answer sets)")
            out.append({**base, "kind": "vqa", "text": rec["question"].strip(),
                        "answers": answers,
                        "qid": rec.get("question_id", f"{path.stem}-{where.rsplit(' ', 1)[-1]}")})
        else:
            raise VlpError(f"{where}: needs a non-empty 'caption' or 'question' field")
    return out


def carve_val(examples: list[dict], cfg: CorpusCfg) -> None:
    """When no example is in 'val', move a fraction of the train images (all their examples)
    there: held-out numbers never see a training image."""
    if any(e["split"] == "val" for e in examples) or cfg.val_fraction <= 0:
        return
    train_images = sorted({e["image"] for e in examples if e["split"] == "train"})
    rng = np.random.default_rng(cfg.seed)
    n = int(round(len(train_images) * cfg.val_fraction))
    val = set(rng.choice(train_images, size=n, replace=False).tolist()) if n else set()
    for e in examples:
        if e["split"] == "train" and e["image"] in val:
            e["split"] = "val"


def run(sources: list[str], features: Path, out: Path, recipe: Recipe,
        skip_missing: bool = False) -> Path:
    """Build a corpus from `sources` (`easy-vqa` or `[SPLIT=]FILE.jsonl`, any number)."""
    cfg = recipe.corpus
    store = FeatureStore(features)
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
