"""The `extract` benchmark: images/s of the whole extraction / of the bare networks' forward.

`bench_extract` divides images/s of the whole extraction pipeline (decode, detect, pool, write
a real store) by images/s of the bare detector + backbone forward on the same images, decoded
and batched beforehand: what the pipeline adds to the two networks.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp_cli import VlpError
from vlp_cli.benches.common import combine, ratio_summary
from vlp_cli.config import ExtractCfg

logger = logging.getLogger(__name__)

# Real photos of the bench: Debian's darknet package data, then scikit-image's bundled photos.
DARKNET_DATA = Path("/usr/share/darknet/data")
DARKNET_PHOTOS = ("dog", "person", "horses", "kite", "giraffe", "eagle")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo_files(folder: Path, copies: int = 4) -> list[tuple[str, Path]]:
    """The bench's real photos written into `folder`, listed `copies` times under distinct keys.

    The darknet photos are used as they are (JPEG); scikit-image's arrays are saved as JPEG
    (quality 95) so that every photo takes the same decode path. Photos that are not
    installed are skipped; none at all is an error.

    Raises:
        VlpError: no photo could be found.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [DARKNET_DATA / f"{n}.jpg" for n in DARKNET_PHOTOS
             if (DARKNET_DATA / f"{n}.jpg").is_file()]
    try:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            out = folder / f"{name}.jpg"
            Image.fromarray(getattr(skimage.data, name)()).save(out, quality=95)
            paths.append(out)
    except ImportError:
        logger.warning("scikit-image is not installed: the photo set has the darknet photos only")
    if not paths:
        raise VlpError(f"no bench photos: neither {DARKNET_DATA} nor scikit-image is installed")
    # Distinct keys for the copies: the writer skips a key it already holds.
    return [(f"copy{c}/{p.name}", p) for c in range(copies) for p in paths]


def easy_vqa_files(n: int) -> list[tuple[str, Path]]:
    """The first n easy-VQA training images (in key order)."""
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root
    from vlp_cli.extractors.images import list_images

    files = list_images(easy_vqa_root() / "train" / "images")[:n]
    if len(files) < n:
        raise VlpError(f"the bench needs {n} easy-VQA training images, found {len(files)}")
    return files


@dataclass
class _ForwardBatch:
    """One batch, decoded and stacked beforehand: backbone inputs by shape, detector input."""

    backbone_inputs: list[torch.Tensor]
    detector_input: torch.Tensor | None


def _predecode(files: list[tuple[str, Path]], extractor: Any, cfg: ExtractCfg,
               ) -> list[_ForwardBatch]:
    """The network inputs of every batch exactly as `extract_batches` builds them."""
    from vlp_cli.extractors.images import ImageFolder

    dataset = ImageFolder(files, cfg.min_size, cfg.max_size,
                          letterbox=extractor.letterbox_size)
    batches = []
    for start in range(0, len(files), cfg.batch_size):
        items = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(files)))]
        bad = [x for x in items if x.error is not None]
        if bad:
            raise VlpError(f"bench image {bad[0].key} did not decode: {bad[0].error}")
        # Grouped by shape as Extractor.__call__ groups them: the same forward calls.
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for x in items:
            groups.setdefault(tuple(x.image.shape), []).append(x.image)
        det = (torch.stack([x.letterboxed[0] for x in items])
               if extractor.detector is not None else None)
        batches.append(_ForwardBatch([torch.stack(g) for g in groups.values()], det))
    return batches


def _extract_part(files: list[tuple[str, Path]], cfg: ExtractCfg, reps: int,
                  target: float) -> dict:
    """The extract ratio over one image set, with one extraction configuration."""
    from vlp_cli.extractors.pipeline import Extractor, extract_batches
    from vlp_cli.stores.features import FeatureStoreWriter

    extractor = Extractor(cfg)
    batches = _predecode(files, extractor, cfg)

    @torch.inference_mode()  # as Extractor.__call__ runs
    def forward(b: _ForwardBatch) -> None:
        for images in b.backbone_inputs:
            extractor.backbone(images)
        if b.detector_input is not None:
            extractor.detector.heads(b.detector_input)

    def rep() -> dict[str, float]:
        """One pass over the images in both arms, alternating batch by batch.

        On these machines speed drifts by tens of percent within a minute; timing the arms
        batch by batch (in alternating order) puts both under the same drift, where two
        whole passes one after the other would not be.
        """
        spent = {"pipeline": 0.0, "forward": 0.0}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            # Opening, writing, committing per batch and closing (with its sync) are all part
            # of the stage; only deleting the temporary store is not timed.
            writer = FeatureStoreWriter(Path(tmp) / "features", extractor.meta(),
                                        commit_every=cfg.commit_every)
            stream = extract_batches(files, extractor, cfg.batch_size, cfg.num_workers)
            spent["pipeline"] += time.perf_counter() - start
            for i, b in enumerate(batches):
                for arm in (("pipeline", "forward") if i % 2 == 0 else ("forward", "pipeline")):
                    start = time.perf_counter()
                    if arm == "forward":
                        forward(b)
                    else:
                        for key, regions, error, _ in next(stream):
                            if error is not None:
                                raise VlpError(f"bench image {key} did not decode: {error}")
                            writer.put(key, regions)
                        writer.flush()
                    spent[arm] += time.perf_counter() - start
            start = time.perf_counter()
            if next(stream, None) is not None:
                raise VlpError("the bench's pre-decoded batches do not match the pipeline's")
            writer.close()
            spent["pipeline"] += time.perf_counter() - start
        return {arm: len(files) / t for arm, t in spent.items()}

    rates: dict[str, list[float]] = {"pipeline": [], "forward": []}
    for r in range(reps + 1):  # repetition 0 is the warm-up
        got = rep()
        if r > 0:
            for arm, rate in got.items():
                rates[arm].append(rate)
    result = ratio_summary(rates, "pipeline", "forward", target)
    result.update(images=len(files), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  min_size=cfg.min_size, max_size=cfg.max_size, detector=cfg.detector)
    return result


def bench_extract(reps: int, easy_vqa_images: int = 256, photo_copies: int = 4,
                  target: float = 0.85) -> dict:
    """Images/s of the whole extraction / images/s of the bare detector + backbone forward.

    The pipeline arm is what `vlp extract-features` does per batch: decode (in DataLoader
    workers when `extract.num_workers` > 0, in process otherwise), detect (forward and NMS),
    RoIAlign, fp16 conversion and a write to a real feature store in a temporary folder. The
    forward arm runs only the two networks on the same batches, decoded, resized, letterboxed
    and stacked beforehand. The arms alternate batch by batch within each repetition. (With
    `num_workers` > 0 the workers would decode ahead while the forward arm runs, flattering
    the pipeline; the recipes' default, and the bench's, is 0.)

    Two image sets: easy-VQA training images (64x64 PNG) with the tiny recipe's extraction
    settings (the demo's, detector on), and real photos (JPEG, 300-770 pixels a side) with
    the default settings.

    Args:
        reps: measured repetitions (after one warm-up).
        easy_vqa_images: how many easy-VQA images.
        photo_copies: how many times the ~10 photos are listed.
        target: the ratio to reach.
    """
    from vlp_cli.config import Recipe, load_recipe

    tiny = load_recipe("tiny").extract
    tiny.detector = "yolov3-tiny"  # the tiny recipe's default already; explicit for the bench
    parts = {"easy-vqa": _extract_part(easy_vqa_files(easy_vqa_images), tiny, reps, target)}
    with tempfile.TemporaryDirectory() as tmp:
        photos = photo_files(Path(tmp), photo_copies)
        parts["photos"] = _extract_part(photos, Recipe().extract, reps, target)
    result = combine(parts, target)
    result["what"] = ("images/s, whole extraction (decode, detect + NMS, RoIAlign, store "
                      "writes) / detector + backbone forward on pre-decoded batches")
    return result
