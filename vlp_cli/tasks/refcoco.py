"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): which region does a sentence mean?

Recipe section `refcoco` (config.RefcocoCfg). Reads corpus kind "refcoco" (readers/refcoco.py:
the sentence, and the referred object's box as its label).

UNITER's model: a score per region from its output state (Linear(H, H), GELU, LayerNorm,
Linear(H, 1)), softmax cross-entropy over the image's regions. The target is the region that
overlaps the ground-truth box most (IoU); a prediction is right when its box has IoU >= 0.5
with the ground-truth box. The same code runs on the two kinds of feature store UNITER reports:
detected boxes (a store from `vlp extract-features`), or ground-truth boxes (a store from
`vlp extract-features --boxes`, one line per image with its annotations' boxes; the target's
IoU is then 1). The whole-image region, when the store has one, is never a candidate.

Reported: accuracy overall and per subset of the refs file (val, test, testA, testB), and the
detector's upper bound (the share of sentences for which some region reaches IoU 0.5). The
results file is `refcoco_results.json`, [{"sent_id", "box": [x, y, w, h] in pixels}];
`vlp evaluate refcoco --predictions F --references "refs(unc).p"` scores such a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ImageInput
from vlp_cli.tasks.base import (Context, Stats, Task, TextImageDataset, count_stat, encode,
                                longs, mean_stat, predict, split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

KIND = "refcoco"
RESULTS_FILE = "refcoco_results.json"
HIT = 0.5  # IoU that counts as a hit


def iou_xyxy(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of [N, 4] boxes with one box, corners (x1, y1, x2, y2)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    h = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = w * h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def xywh_to_xyxy(box: list[float]) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x, y, x + w, y + h])


def _corners(img: ImageInput) -> np.ndarray:
    """[R, 4] the regions' corners over the image size (those of blanked regions too)."""
    return img.corners if img.corners is not None else img.pos[:, :4]


def region_ious(img: ImageInput, gt_xywh: list[float]) -> list[float]:
    """IoU of each region of `img` with the ground-truth box (pixels, COCO's x, y, w, h);
    -1 for the whole-image region. Positions hold corners over the image size, and IoU is the
    same in those units."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise VlpError("the feature store has no image sizes; re-extract it with vlp >= 0.3")
    gt = xywh_to_xyxy(gt_xywh) / np.array([w, h, w, h])
    ious = iou_xyxy(_corners(img), gt).tolist()
    if img.whole_image:
        ious[0] = -1.0
    return ious


def _ious(ex: dict, img: ImageInput) -> dict:
    """The target: each region's IoU with the referred box."""
    return {"ious": region_ious(img, ex["label"]["box"])}


def ref_metrics(rows: list[dict]) -> dict:
    metrics: dict[str, Any] = {
        "accuracy": 100 * float(np.mean([r["iou"] >= HIT for r in rows])),
        "upper_bound": 100 * float(np.mean([r["best_iou"] >= HIT for r in rows])),
        "sentences": len(rows)}
    for subset in sorted({r["subset"] for r in rows if r.get("subset")}):
        metrics[f"accuracy_{subset}"] = 100 * float(np.mean(
            [r["iou"] >= HIT for r in rows if r.get("subset") == subset]))
    return metrics


class Refcoco(Task):
    name = "refcoco"
    help = "referring expressions: the region a sentence means, accuracy at IoU 0.5"
    kinds = (KIND,)
    metrics = ("accuracy", "upper_bound", "sentences")
    report = ("accuracy", "accuracy_val", "accuracy_testA", "accuracy_testB", "upper_bound",
              "sentences")
    headline = "accuracy"
    select = "acc"
    uses_pooler = False

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, "regions", 1)]

    def dataset(self, ctx: Context, split: str, seed: int) -> TextImageDataset:
        return TextImageDataset(ctx.corpus, ctx.builder, split_indices(ctx.corpus, KIND, split),
                                self.recipe.refcoco.max_text_len, _ious, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        import torch

        ious = torch.full(batch["img_mask"].shape, -1.0)
        for i, x in enumerate(items):
            ious[i, :len(x["ious"])] = torch.as_tensor(x["ious"])
        batch["region_ious"] = ious
        batch["index"] = longs(items, "index")

    def scores(self, model: VLPModel, batch: dict) -> torch.Tensor:
        """[B, R]: each region's score; non-candidates (padding, the whole image) -1e4."""
        hidden = encode(model, batch)
        everywhere = batch["img_mask"].new_ones(batch["img_mask"].shape, dtype=bool)
        out = model.region_outputs(self.name, hidden, everywhere).view(everywhere.shape)
        return out.float().masked_fill(batch["region_ious"] < 0, -1e4)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        scores = self.scores(model, batch)
        ious = batch["region_ious"]
        loss = F.cross_entropy(scores, ious.argmax(-1))
        b = scores.shape[0]
        hit = (ious.gather(1, scores.argmax(-1, keepdim=True)) >= HIT).sum()
        return loss, {"loss": mean_stat(loss, b), "acc": count_stat(hit, b)}

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        rows = []
        for ex, r in predict(self, ctx, split, limit, accelerator,
                             lambda b: self.scores(model, b).argmax(-1)):
            img = ctx.builder.regions(ex["images"][0])
            ious = region_ious(img, ex["label"]["box"])
            w, h = img.size
            x1, y1, x2, y2 = (_corners(img)[r] * np.array([w, h, w, h])).tolist()
            rows.append({"sent_id": ex["id"], "image": ex["images"][0],
                         "sentence": ex["texts"][0], "subset": ex["label"].get("subset"),
                         "box": [x1, y1, x2 - x1, y2 - y1], "gt_box": ex["label"]["box"],
                         "iou": ious[r], "best_iou": max(ious)})
        return ref_metrics(rows), rows

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        return {RESULTS_FILE: [{"sent_id": p["sent_id"], "box": p["box"]} for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        from vlp_cli.readers import refcoco
        from vlp_cli.readers.files import load_json

        data = load_json(predictions, "--predictions")
        if not (isinstance(data, list) and all(
                isinstance(d, dict) and "sent_id" in d and isinstance(d.get("box"), list)
                and len(d["box"]) == 4 for d in data)):
            raise VlpError(f"--predictions {predictions}: expected a list of {{\"sent_id\", "
                           "\"box\": [x, y, w, h]}")
        boxes = {d["sent_id"]: d["box"] for d in data}
        refs = refcoco.read(str(references), references.parent)
        known = {e["id"] for e in refs}
        stray = [k for k in boxes if k not in known]
        if stray:
            raise VlpError(f"--predictions {predictions}: {len(stray)} sent_ids are not in "
                           f"{references} (first: {stray[0]}); score against the refs file "
                           "they came from")
        missing = [e["id"] for e in refs if e["id"] not in boxes]
        if missing:
            raise VlpError(f"--predictions {predictions}: no box for {len(missing)} sentences "
                           f"of {references} (first: sent_id {missing[0]}); answer them all, "
                           "or score one split: --references 'test=refs(unc).p'")
        rows = []
        for e in refs:
            iou = float(iou_xyxy(xywh_to_xyxy(boxes[e["id"]]), xywh_to_xyxy(e["label"]["box"]))[0])
            rows.append({"sent_id": e["id"], "subset": e["label"]["subset"], "iou": iou,
                         "best_iou": 1.0, "box": boxes[e["id"]], "gt_box": e["label"]["box"]})
        metrics = ref_metrics(rows)
        metrics.pop("upper_bound")
        return metrics, rows


TASK = Refcoco()
