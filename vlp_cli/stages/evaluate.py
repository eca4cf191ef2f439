"""vlp evaluate TASK: a fine-tuned checkpoint + a corpus split -> metrics (JSON)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlp_cli import VlpError
from vlp_cli.checkpoint import quiet_transformers
from vlp_cli.config import Recipe
from vlp_cli.console import progress
from vlp_cli.data.datasets import CaptionDataset, Collator, RetrievalTrainDataset, VqaDataset
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.outputs import check_writable
from vlp_cli.decoding import greedy_captions
from vlp_cli.stages.common import device, open_checkpoint_inputs
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks import encode

logger = logging.getLogger(__name__)
TASKS = ("vqa", "retrieval", "captioning")


def evaluate_vqa(model: Any, c: Corpus, builder: ExampleBuilder, recipe: Recipe, split: str,
                 answers: list[str], limit: int | None) -> tuple[dict, list[dict]]:
    from vlp_cli.metrics import vqa_accuracy

    idx = c.require("vqa", split)[:limit]
    ds = VqaDataset(c, builder, idx, recipe.vqa.max_text_len)
    loader = DataLoader(ds, batch_size=recipe.vqa.train.batch_size * 2,
                        collate_fn=Collator(builder.pad_id, len(answers)))
    dev = device()
    preds: list[dict] = []
    with progress() as bar, torch.no_grad():
        task = bar.add_task("vqa eval", total=len(ds))
        for batch in loader:
            batch = {k: v.to(dev) for k, v in batch.items()}
            top = model.vqa_logits(encode(model, batch)).argmax(-1).tolist()
            for i, a in zip(batch["index"].tolist(), top):
                ex = c.get(i)
                preds.append({"qid": ex.get("qid"), "image": ex["image"], "question": ex["text"],
                              "prediction": answers[a], "answers": ex["answers"],
                              "accuracy": vqa_accuracy(answers[a], ex["answers"])})
            bar.advance(task, len(top))
    acc = [p["accuracy"] for p in preds]
    yes_no = [p["accuracy"] for p in preds if p["answers"][0].lower() in ("yes", "no")]
    other = [p["accuracy"] for p in preds if p["answers"][0].lower() not in ("yes", "no")]
    metrics = {"vqa_accuracy": 100 * float(np.mean(acc)), "questions": len(preds),
               "yes/no": 100 * float(np.mean(yes_no)) if yes_no else None,
               "other": 100 * float(np.mean(other)) if other else None}
    return metrics, preds


def unique_caption_images(c: Corpus, split: str) -> tuple[list[str], list[list[int]], int]:
    """Images of `split` whose captions no other image shares (one image per caption).

    Returns the image keys (sorted), each image's caption ids, and how many images the split
    has in all.
    """
    by_image: dict[str, list[dict]] = {}
    for i in c.require("caption", split):
        ex = c.get(int(i))
        by_image.setdefault(ex["image"], []).append(ex)
    owners: dict[str, set[str]] = {}
    for key, exs in by_image.items():
        for ex in exs:
            owners.setdefault(ex["text"].strip().lower(), set()).add(key)
    keep = sorted(k for k, exs in by_image.items()
                  if all(len(owners[e["text"].strip().lower()]) == 1 for e in exs))
    return keep, [[e["ids"] for e in by_image[k]] for k in keep], len(by_image)


def evaluate_retrieval(model: Any, c: Corpus, builder: ExampleBuilder, recipe: Recipe,
                       split: str, limit: int | None) -> tuple[dict, list[dict]]:
    """All-pairs scoring with the matched/unmatched head (Oscar), R@1/5/10 both ways."""
    from vlp_cli.metrics import retrieval_recall

    keys, captions, total = unique_caption_images(c, split)
    unique = len(keys)
    n = min(limit or recipe.retrieval.eval_images or unique, unique)
    if n < unique:
        # A fixed random subset, the same for every model evaluated with this seed.
        pick = np.sort(np.random.default_rng(recipe.seed).choice(unique, n, replace=False))
        keys, captions = [keys[i] for i in pick], [captions[i] for i in pick]
    logger.info("retrieval on %s: %d of %d images have captions no other image shares; "
                "scoring %d of them x their captions, all pairs", split, unique, total, n)
    texts = [t for caps in captions for t in caps]
    text_to_image = np.array([i for i, caps in enumerate(captions) for _ in caps])
    images = [builder.regions(k) for k in keys]
    pairer = RetrievalTrainDataset(c, builder, np.zeros(0), recipe.data.max_text_len, 0)
    collate = Collator(builder.pad_id)
    scores = np.zeros((len(images), len(texts)), np.float32)
    pairs = [(i, j) for i in range(len(images)) for j in range(len(texts))]
    bs = recipe.retrieval.eval_batch_size
    dev = device()
    with progress() as bar, torch.no_grad():
        task = bar.add_task("retrieval eval", total=len(pairs))
        for start in range(0, len(pairs), bs):
            chunk = pairs[start: start + bs]
            batch = collate([pairer.pair(texts[j], images[i], 0) for i, j in chunk])
            batch = {k: v.to(dev) for k, v in batch.items()}
            prob = model.match_logits(encode(model, batch)).softmax(-1)[:, 1].float().cpu()
            for (i, j), p in zip(chunk, prob.tolist()):
                scores[i, j] = p
            bar.advance(task, len(chunk))
    metrics = retrieval_recall(scores, text_to_image)
    metrics.update(images=len(images), texts=len(texts), unique_caption_images=unique,
                   split_images=total)
    ranked = [{"image": keys[i], "top_texts": [int(j) for j in np.argsort(-scores[i])[:5]]}
              for i in range(len(images))]
    return metrics, ranked


def evaluate_captioning(model: Any, tok: Any, c: Corpus, builder: ExampleBuilder,
                        recipe: Recipe, split: str, limit: int | None) -> tuple[dict, list[dict]]:
    from vlp_cli.metrics import caption_metrics

    refs: dict[str, list[str]] = {}
    for i in c.require("caption", split):
        ex = c.get(int(i))
        refs.setdefault(ex["image"], []).append(ex["text"])
    keys = sorted(refs)[:limit]
    ds = CaptionDataset(c, builder, np.zeros(0), recipe.captioning,
                        recipe.data.max_text_len + recipe.captioning.max_caption_len, 0)
    caps = []
    with progress() as bar:
        task = bar.add_task("captioning eval", total=len(keys))
        for start in range(0, len(keys), 64):
            chunk = keys[start: start + 64]
            caps += greedy_captions(model, ds, [builder.regions(k) for k in chunk], tok,
                                    device=device())
            bar.advance(task, len(chunk))
    preds = {k: p for k, p in zip(keys, caps)}
    metrics = caption_metrics(preds, {k: refs[k] for k in keys}).as_dict()
    metrics["images"] = len(keys)
    return metrics, [{"image": k, "caption": preds[k], "references": refs[k]} for k in keys]


def run(task: str, checkpoint: Path, corpus: Path, features: Path, recipe: Recipe,
        split: str = "test", out: Path | None = None, limit: int | None = None) -> dict:
    """Score `checkpoint` on `task` over a corpus split; write metrics JSON and predictions."""
    if task not in TASKS:
        raise VlpError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    out = Path(out) if out is not None else Path(checkpoint) / f"eval-{split}.json"
    # Refused now, not after the whole evaluation has run.
    check_writable(out, file=True)
    check_writable(out.with_suffix(".predictions.jsonl"), file=True)
    quiet_transformers()
    o = open_checkpoint_inputs(checkpoint, corpus, features)
    model, tok, meta, c, store = o.model, o.tokenizer, o.meta, o.corpus, o.features
    if meta.get("task") != task:
        raise VlpError(f"checkpoint {checkpoint} is a '{meta.get('task')}' checkpoint, not "
                       f"'{task}': run `vlp finetune {task}` on it first")
    model.to(device()).eval()
    builder = ExampleBuilder(tok, store, recipe.data)
    if task == "vqa":
        metrics, preds = evaluate_vqa(model, c, builder, recipe, split, meta["answers"], limit)
    elif task == "retrieval":
        metrics, preds = evaluate_retrieval(model, c, builder, recipe, split, limit)
    else:
        metrics, preds = evaluate_captioning(model, tok, c, builder, recipe, split, limit)
    result = {"task": task, "split": split, "checkpoint": str(checkpoint), **metrics}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        with out.with_suffix(".predictions.jsonl").open("w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
    except OSError as exc:
        # The folder was writable when the run started; keep the metrics an evaluation cost.
        from vlp_cli.console import out as stdout

        stdout.print_json(json.dumps(result))
        raise VlpError(f"could not write {exc.filename or out} ({exc.strerror or exc}); the "
                       "metrics are printed above") from None
    return result
