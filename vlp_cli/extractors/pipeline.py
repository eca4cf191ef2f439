"""The extractor: boxes and tags (detector, given, or grid) + RoIAlign features per image.

One `Extractor` serves `vlp extract-features` and `vlp caption --images`: it can be rebuilt
from a feature store's metadata, so raw images get exactly the features a checkpoint saw.
`extract_batches` streams a list of image files through it, decoded in DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlp_cli import VlpError
from vlp_cli.config import ExtractCfg
from vlp_cli.extractors.backbone import Backbone, file_sha256, grid_boxes, load_backbone
from vlp_cli.extractors.given import GivenBoxes
from vlp_cli.extractors.images import Decoded, ImageFolder, collate_decoded, one_torch_thread
from vlp_cli.stores.features import Regions, fingerprint

logger = logging.getLogger(__name__)


@dataclass
class DetectorInfo:
    name: str
    cfg: str
    weights_sha256: str
    input_size: int
    labels: list[str]


def load_detector(cfg: ExtractCfg) -> tuple[Any, DetectorInfo]:
    """The embedded YOLOv3-tiny, or any Darknet-format detector named in the recipe."""
    from vlp_cli.extractors.detect import Detector, embedded_detector_paths

    if cfg.detector == "yolov3-tiny":
        paths = embedded_detector_paths()
        cfg_path, weights, labels = paths.cfg, paths.weights, paths.labels
    else:
        missing = [k for k in ("detector_cfg", "detector_weights", "detector_labels")
                   if not getattr(cfg, k)]
        if missing:
            raise VlpError(f"extract.detector=darknet needs {', '.join(missing)} "
                           "(--detector-cfg, --detector-weights, --labels)")
        cfg_path, weights, labels = (Path(cfg.detector_cfg), Path(cfg.detector_weights),
                                     Path(cfg.detector_labels))
        for p in (cfg_path, weights, labels):
            if not p.is_file():
                raise VlpError(f"detector file {p} not found")
    det = Detector.from_darknet(cfg_path, weights, labels, input_size=cfg.detector_input or None)
    info = DetectorInfo(name=cfg.detector if cfg.detector != "darknet" else Path(cfg_path).stem,
                        cfg=Path(cfg_path).name, weights_sha256=file_sha256(Path(weights)),
                        input_size=int(det.input_size[0]), labels=det.labels)
    return det, info


class Extractor:
    """Pixels -> Regions: boxes from the detector, a boxes file or a grid; features by RoIAlign.

    Every image also gets a whole-image feature, outside the box budget and without a tag.
    """

    def __init__(self, cfg: ExtractCfg, given: GivenBoxes | None = None,
                 labels: list[str] | None = None):
        self.cfg = cfg
        self.given = given
        self.backbone: Backbone = load_backbone(cfg.backbone, cfg.fine_stride)
        self.detector = None
        self.detector_info: DetectorInfo | None = None
        if given is not None:
            self.labels = labels if labels is not None else given.labels
        elif cfg.detector == "grid":
            self.labels = []
        else:
            self.detector, self.detector_info = load_detector(cfg)
            self.labels = self.detector_info.labels
        self._label_ids = {x: i for i, x in enumerate(self.labels)}
        if given is not None:
            unknown = sorted(set(given.labels) - set(self._label_ids))
            if unknown:
                raise VlpError(f"given boxes use labels {unknown[:5]} outside the tag vocabulary")
            # Given class distributions are over the file's vocabulary: these are its columns
            # in the store's (the same list, unless rebuilt from a store's metadata).
            self._given_columns = np.asarray([self._label_ids[x] for x in given.labels], np.int64)

    # -- identity --------------------------------------------------------------------------------

    def meta(self) -> dict:
        """Store metadata: enough to reproduce the extraction on new images, or to refuse."""
        if self.given is not None:
            boxes: dict = {"source": "given", "file_sha256": self.given.sha256}
            if self.given.probs:
                boxes["class_probs"] = "given per box in the boxes file, over the labels"
        elif self.detector_info is not None:
            d = self.detector_info
            boxes = {"source": "detector", "detector": d.name, "cfg": d.cfg,
                     "weights_sha256": d.weights_sha256, "input_size": d.input_size,
                     "keep_conf_th": self.cfg.keep_conf_th, "nms_iou": self.cfg.nms_iou,
                     "max_detections": self.cfg.max_detections,
                     "class_probs": "YOLO has no background class: per-class scores times "
                                    "objectness, renormalised to sum to 1"}
        else:
            boxes = {"source": "grid", "grid": self.cfg.fallback_grid}
        ext = {
            "name": f"vlp-roi/{self.backbone.info.name}",
            "backbone": vars(self.backbone.info),
            "config": {"min_size": self.cfg.min_size, "max_size": self.cfg.max_size,
                       "roi_output": self.cfg.roi_output,
                       # only when set: the stores of earlier versions keep their fingerprint
                       **({"fine_stride": self.cfg.fine_stride} if self.cfg.fine_stride
                          else {})},
            "boxes": boxes,
            # Given boxes come from outside: new images need a boxes file of their own.
            "reproducible": self.given is None,
        }
        # The fingerprint names the feature space (backbone and pooling), not the boxes:
        # features of one space from different box sources can be mixed and compared.
        space = {k: v for k, v in ext.items() if k not in ("boxes", "reproducible")}
        return {"extractor": ext, "fingerprint": fingerprint(space),
                "feature_dim": self.backbone.feature_dim, "labels": self.labels}

    @classmethod
    def from_meta(cls, meta: dict, boxes: GivenBoxes | None = None,
                  fallback_detector: bool = False) -> Extractor:
        """Rebuild the extractor a feature store (or checkpoint) records, or refuse. Features
        made from given boxes need `boxes` for new images; with `fallback_detector` the
        embedded detector finds them instead (a warning: its tags are COCO's 80 classes, which
        a model trained on other tags has not seen)."""
        ext = meta.get("extractor") or {}
        if not str(ext.get("name", "")).startswith("vlp-roi/"):
            raise VlpError(f"features from {ext.get('name')!r} cannot be reproduced from raw "
                           "images by vlp's extractor: pass features instead")
        src = ext.get("boxes", {})
        fallback = src.get("source") == "given" and boxes is None
        if fallback:
            if not fallback_detector:
                raise VlpError("these features were made from given boxes: pass --boxes "
                               "FILE.jsonl for the new images")
            logger.warning("the checkpoint's features came from given boxes and none were "
                           "passed (--boxes): boxes and tags come from the embedded yolov3-tiny "
                           "detector instead (COCO's classes as tags)")
            src = {"source": "detector", "detector": "yolov3-tiny", "input_size": 416,
                   "keep_conf_th": 0.05, "nms_iou": 0.45, "max_detections": 100}
        cfg = ExtractCfg(backbone=ext["backbone"]["name"], **ext["config"])
        if src.get("source") == "grid":
            cfg.detector, cfg.fallback_grid = "grid", int(src.get("grid", 3))
        elif src.get("source") == "detector":
            if src.get("detector") != "yolov3-tiny":
                raise VlpError(f"these features used detector {src.get('detector')!r}; vlp can "
                               "only rebuild the embedded yolov3-tiny from metadata")
            cfg.detector, cfg.detector_input = "yolov3-tiny", int(src["input_size"])
            cfg.keep_conf_th, cfg.nms_iou = float(src["keep_conf_th"]), float(src["nms_iou"])
            cfg.max_detections = int(src["max_detections"])
        out = cls(cfg, given=boxes, labels=None if fallback else meta.get("labels"))
        if out.backbone.info.weights_sha256 != ext["backbone"].get("weights_sha256"):
            raise VlpError("the installed backbone weights differ from the ones these features "
                           "were extracted with")
        if (out.detector_info is not None and not fallback
                and out.detector_info.weights_sha256 != src.get("weights_sha256")):
            raise VlpError("the installed detector weights differ from the recorded ones")
        return out

    # -- work ------------------------------------------------------------------------------------

    @property
    def letterbox_size(self) -> tuple[int, int] | None:
        """The detector's input (w, h), for letterboxing in the DataLoader workers."""
        return None if self.detector is None else tuple(self.detector.input_size)

    @torch.inference_mode()
    def __call__(self, items: list[Decoded]) -> list[Regions]:
        """Regions for a batch of decoded images (none of which failed)."""
        if not items:
            return []
        # Images of the same resized shape run together; padding different sizes into one
        # batch would make an image's features depend on its batch-mates.
        # Only the two networks run on all of torch's threads; the small work around them runs
        # on one (see one_torch_thread): same results, no barrier waits on a busy machine.
        fmaps: list[Any] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.image.shape), []).append(i)  # type: ignore[union-attr]
        for idx in groups.values():
            with one_torch_thread():
                batch = (items[idx[0]].image[None] if len(idx) == 1  # type: ignore[index]
                         else torch.stack([items[i].image for i in idx]))  # type: ignore[misc]
            out_maps = self.backbone(batch)
            for i, fm in zip(idx, zip(*out_maps) if isinstance(out_maps, tuple) else out_maps):
                fmaps[i] = fm
        dets: list[Any] = [None] * len(items)
        if self.detector is not None:
            # Stacked a sub-batch at a time inside heads(): no copy of the whole batch.
            heads = self.detector.heads([x.letterboxed[0] for x in items])  # type: ignore[index]
            with one_torch_thread():
                dets = self._detections(heads, items)
        with one_torch_thread():
            return [self._regions(x, fm, d) for x, fm, d in zip(items, fmaps, dets)]

    def _detections(self, predictions: torch.Tensor, items: list[Decoded]) -> list[Any]:
        """Each image's detections from the batch's head outputs [B, M, 5 + C].

        `postprocess` keeps exactly the rows whose best class score (objectness x class
        probability) exceeds `keep_conf_th`. That score is computed here for the whole batch
        in one op, the same way, and each image's postprocess gets only those rows, in their
        order: the same detections, without B passes over all M x C scores.
        """
        assert self.detector is not None
        preds = predictions.float()
        best = (preds[..., 4:5] * preds[..., 5:]).amax(dim=-1)  # [B, M]
        keep = best > self.cfg.keep_conf_th
        cfg = self.cfg
        return [self.detector.postprocess(preds[i][keep[i]], x.letterboxed[1],  # type: ignore
                                          cfg.keep_conf_th, cfg.nms_iou, cfg.max_detections)
                for i, x in enumerate(items)]

    def _regions(self, item: Decoded, fmap: torch.Tensor, det: Any) -> Regions:
        w, h = item.width, item.height
        probs = None
        if det is not None:
            boxes = det.boxes.numpy().astype(np.float32)
            cls = det.class_ids.numpy().astype(np.int32)
            scores = det.scores.numpy().astype(np.float32)
            probs = det.class_probs.numpy().astype(np.float16)
        elif self.given is not None:
            empty = (np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32))
            boxes, labels, scores = self.given.boxes.get(item.key, empty)
            boxes = boxes.copy()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            cls = np.asarray([self._label_ids[x] for x in labels], np.int32)
            if self.given.probs:  # then every image's record carries them, even with no box
                probs = np.zeros((len(boxes), len(self.labels)), np.float16)
                if item.key in self.given.probs:
                    probs[:, self._given_columns] = self.given.probs[item.key]
        else:
            boxes = grid_boxes(w, h, self.cfg.fallback_grid)
            cls = np.full(len(boxes), -1, np.int32)  # grid cells carry no tag
            scores = np.ones(len(boxes), np.float32)
        # Boxes are in original pixels; the map was computed on the resized image.
        rh, rw = item.image.shape[1], item.image.shape[2]  # type: ignore[union-attr]
        scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)
        all_boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes], 0)
        pooled = self.backbone.pool(fmap, torch.from_numpy(all_boxes) * scale,
                                    self.cfg.roi_output)
        feats = pooled.float().numpy().astype(np.float16)
        return Regions(features=feats[1:], boxes=boxes, class_ids=cls, confidences=scores,
                       width=w, height=h, class_probs=probs, image_feature=feats[0])


def extract_batches(files: list[tuple[str, Path]], extractor: Extractor, batch_size: int,
                    num_workers: int, keep_rgb: bool = False,
                    ) -> Iterator[list[tuple[str, Regions | None, str | None, object]]]:
    """Per batch: (key, regions or None, error or None, decoded image) for each file."""
    cfg = extractor.cfg
    dataset = ImageFolder(files, cfg.min_size, cfg.max_size,
                          letterbox=extractor.letterbox_size, keep_rgb=keep_rgb)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_decoded)
    batches = iter(loader)
    while True:
        # Without workers the batch is decoded here, on this process's threads: on one torch
        # thread, as a worker would (see one_torch_thread).
        with one_torch_thread() if num_workers == 0 else nullcontext():
            batch = next(batches, None)
        if batch is None:
            break
        good = [x for x in batch if x.error is None]
        regions = dict(zip((x.key for x in good), extractor(good)))
        yield [(x.key, regions.get(x.key), x.error, x) for x in batch]
