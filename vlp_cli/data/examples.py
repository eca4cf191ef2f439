"""Assembling one model input from a corpus example and the feature store.

Oscar's triple: `[CLS] words [SEP] tags [SEP]` (words type 0, tags type 1) followed by the
regions. Tags are the labels of the boxes the read-time policy selects, so tags and features
always come from the same selection; the whole-image region, when the store has one, goes
first and carries no tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.config import DataCfg
from vlp_cli.stores.corpus import Corpus
from vlp_cli.stores.features import FeatureStore, Regions, position_features


# The whole image as a region: the box (0, 0, W, H) normalised (x1, y1, x2, y2, w, h, w*h).
_WHOLE_IMAGE = np.array([[0, 0, 1, 1, 1, 1, 1]], np.float32)


@dataclass
class ImageInput:
    """The regions of one image as the model sees them."""

    feats: np.ndarray  # [R, F] float16
    pos: np.ndarray  # [R, P] float32
    tag_classes: list[int]  # class ids of the tagged boxes, in box order
    classes: np.ndarray | None = None  # [R] the store's class id per region (-1: none)
    probs: np.ndarray | None = None  # [R, C] the detector's class distribution, when read
    whole_image: bool = False  # the first region is the whole image (no box, no class)
    size: tuple[int, int] = (0, 0)  # the image's (width, height) in pixels, when known
    # [R, 4] each region's corners over the image size, as `pos` holds them; kept when the
    # regions are blanked (`data.blank_regions`), so a text-only model's boxes still score
    corners: np.ndarray | None = None


@dataclass
class TextInput:
    """Token ids of the text part and the span layout needed for masking."""

    ids: list[int]  # [CLS] a [SEP] b [SEP]
    types: list[int]
    a_span: tuple[int, int]  # positions of the words (without specials)
    b_span: tuple[int, int]  # positions of the tags


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer sequence until both fit (BERT's/Oscar's rule)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


# Detector labels that are not the words a caption uses: Darknet's and PASCAL VOC's run-together
# names, as COCO spells them today. Any other label is used as it is.
TAG_WORDS = {"pottedplant": "potted plant", "diningtable": "dining table", "tvmonitor": "tv",
             "aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch"}
# Plurals that adding -s / -es / -ies gets wrong; nouns the same in both numbers map to
# themselves.
_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "mouse": "mice", "knife": "knives", "leaf": "leaves",
    "wolf": "wolves", "shelf": "shelves", "loaf": "loaves", "scarf": "scarves", "ox": "oxen",
    "sheep": "sheep", "fish": "fish", "deer": "deer", "skis": "skis", "scissors": "scissors",
    "glasses": "glasses", "jeans": "jeans", "pants": "pants", "shorts": "shorts",
    "bus": "buses", "tomato": "tomatoes", "potato": "potatoes", "hair drier": "hair driers",
}


def tag_words(label: str) -> str:
    """A detector label as caption words ("pottedplant" -> "potted plant")."""
    return TAG_WORDS.get(label.strip().lower(), label.strip())


def plural(words: str) -> str:
    """English plural of a tag's words, its last word inflected ("traffic light" -> "traffic
    lights", "bench" -> "benches", "person" -> "people")."""
    low = words.lower()
    if low in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[low]
    head, _, last = words.rpartition(" ")
    if last.lower() in _IRREGULAR_PLURALS:
        out = _IRREGULAR_PLURALS[last.lower()]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


class ExampleBuilder:
    """Reads regions and builds Oscar-style sequences; shared by every task's dataset."""

    def __init__(self, tokenizer: Any, features: FeatureStore | None, cfg: DataCfg,
                 labels: list[str] | None = None):
        self.features = features  # None when regions come from memory (`image_input`)
        self.cfg = cfg
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id)
        self.vocab_size = int(len(tokenizer))
        self.special_ids = set(int(i) for i in tokenizer.all_special_ids)
        # Multi-word labels ("traffic light") stay one tag; their word pieces are cached once.
        # A label is read as caption words (`tag_words`: Darknet's "pottedplant" is "potted
        # plant"); `tag_forms` adds the plural, the forms a caption may use (constrained
        # decoding accepts either).
        words = [tag_words(label) for label in
                 (labels if labels is not None else features.labels)]
        self.tag_pieces = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
        self.tag_forms = [[p, tokenizer(plural(w), add_special_tokens=False).input_ids]
                          if plural(w) != w else [p] for w, p in zip(words, self.tag_pieces)]
        self.pos_dim = 7 if cfg.pos_kind == "uniter7" else 6

    def regions(self, key: str, probs: bool = False) -> ImageInput:
        """The regions of an image; `probs` also reads the class distributions (MRC-kl)."""
        c = self.cfg
        if self.features is None:
            raise ValueError("this builder has no feature store; use image_input()")
        try:
            # Views into the store: image_input and the collator copy what they use, once.
            r: Regions = self.features.get_selected(key, c.conf_th, c.min_boxes, c.max_boxes,
                                                    copy=False, probs=probs)
        except KeyError:
            raise VlpError(f"image {key!r} is not in feature store {self.features.path}: "
                           "extract it, or pass the store the corpus was built on") from None
        return self.image_input(r)

    def image_input(self, r: Regions) -> ImageInput:
        """Model-ready regions from a (selected) record, e.g. one extracted in memory."""
        c = self.cfg
        has_image = c.image_region and r.image_feature is not None
        r = r.take(max(c.max_regions - int(has_image), 0))
        feats, boxes = r.features, r.boxes
        if r.positions is not None:  # computed at extraction (stores since 0.3)
            pos = r.positions if self.pos_dim == 7 else r.positions[:, :self.pos_dim]
        else:
            pos = position_features(boxes, r.width, r.height, c.pos_kind)
        classes = np.asarray(r.class_ids, np.int64)
        probs = r.class_probs
        if has_image:
            feats = np.concatenate([r.image_feature[None], feats], 0)
            pos = np.concatenate([_WHOLE_IMAGE[:, :self.pos_dim], pos], 0)
            classes = np.concatenate([[-1], classes])
            if probs is not None:
                probs = np.concatenate([np.zeros((1, probs.shape[1]), probs.dtype), probs], 0)
        tags = [int(x) for x in r.class_ids if x >= 0] if c.use_tags else []
        corners = pos[:, :4]
        if c.blank_regions:  # the text-only baseline: nothing of the image but its box count
            feats, pos, tags = np.zeros_like(feats), np.zeros_like(pos), []
        return ImageInput(feats, pos, tags, classes, probs, has_image, (r.width, r.height),
                          corners)

    def image_sizes(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(regions, tag word pieces) that `regions` gives each image, as int arrays.

        For length-bucketed batching: one read of each distinct image's record (a view, no
        copy, the class distribution neither read nor checked), a few microseconds each.
        """
        c = self.cfg
        seen: dict[str, tuple[int, int]] = {}
        for key in keys:
            if key in seen:
                continue
            try:
                r = self.features.get_selected(key, c.conf_th, c.min_boxes, c.max_boxes,
                                               copy=False, probs=False)
            except KeyError:
                raise VlpError(f"image {key!r} is not in feature store {self.features.path}: "
                               "extract it, or pass the store the corpus was built on") from None
            has_image = int(c.image_region and r.image_feature is not None)
            n = min(len(r), max(c.max_regions - has_image, 0))
            tags = len(self.tag_ids([int(x) for x in r.class_ids[:n] if x >= 0])) \
                if c.use_tags else 0
            seen[key] = (n + has_image, tags)
        sizes = np.array([seen[k] for k in keys], np.int64).reshape(-1, 2)
        return sizes[:, 0], sizes[:, 1]

    @staticmethod
    def text_lengths(words: np.ndarray, tags: np.ndarray, max_len: int) -> np.ndarray:
        """Lengths `text` gives (words, tag pieces) pairs: `[CLS] a [SEP] b [SEP]` within
        max_len, or `[CLS] a [SEP]` without tags."""
        words, tags = np.asarray(words, np.int64), np.asarray(tags, np.int64)
        return np.where(tags > 0, np.minimum(words + tags, max_len - 3) + 3,
                        np.minimum(words, max_len - 2) + 2)

    def tag_classes(self, key: str) -> list[int]:
        """Only the tags of an image (for Oscar's polluted-tag negatives)."""
        return self.regions(key).tag_classes

    def tag_ids(self, classes: list[int]) -> list[int]:
        out: list[int] = []
        for c in classes:
            if 0 <= c < len(self.tag_pieces):
                out.extend(self.tag_pieces[c])
            if len(out) >= self.cfg.max_tag_len:
                break
        return out[: self.cfg.max_tag_len]

    def text(self, words: list[int], tags: list[int], max_len: int) -> TextInput:
        """`[CLS] words [SEP] tags [SEP]` within max_len (or `[CLS] words [SEP]` without tags)."""
        if tags:
            a, b = truncate_pair(words, tags, max_len - 3)
            ids = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
            return TextInput(ids, types, (1, 1 + len(a)), (2 + len(a), 2 + len(a) + len(b)))
        a = list(words[: max_len - 2])
        return TextInput([self.cls_id, *a, self.sep_id], [0] * (len(a) + 2), (1, 1 + len(a)),
                         (2 + len(a), 2 + len(a)))


def mask_tokens(ids: list[int], candidates: list[int], prob: float, builder: ExampleBuilder,
                rng: np.random.Generator, max_masked: int | None = None,
                at_least_one: bool = True) -> tuple[list[int], list[int]]:
    """BERT masking: choose `prob` of the candidate positions; 80% [MASK], 10% random, 10% kept.

    Returns the corrupted ids and labels (-100 where nothing is predicted). At least one
    position is chosen when there is any candidate, so every example contributes to the loss.
    """
    ids = list(ids)
    labels = [-100] * len(ids)
    if not candidates:
        return ids, labels
    chosen = [p for p in candidates if rng.random() < prob]
    if not chosen and at_least_one:
        chosen = [int(rng.choice(candidates))]
    if max_masked is not None and len(chosen) > max_masked:
        chosen = sorted(rng.choice(chosen, size=max_masked, replace=False).tolist())
    for p in chosen:
        labels[p] = ids[p]
        u = rng.random()
        if u < 0.8:
            ids[p] = builder.mask_id
        elif u < 0.9:
            ids[p] = int(rng.integers(0, builder.vocab_size))
    return ids, labels


class TaskDataset:
    """Examples of a corpus (by index) turned into items by a task's `__getitem__`.

    A plain map-style dataset (len and getitem; DataLoader asks nothing more), so that task
    files import without torch.
    """

    max_text_len: int = 512  # BERT's positions; every task dataset sets its own
    with_tags: bool = True  # whether items carry the image's tags (UNITER's objectives: no)
    # What an item may take from another example (a negative): its image (ITM), its tags
    # (Oscar) or its words (Oscar+). `sizes()` then bounds that part by the dataset's largest,
    # so that a batch filled to `max_units` never exceeds it, whichever items are swapped.
    swaps: frozenset[str] = frozenset()

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray, seed: int):
        self.corpus = corpus
        self.builder = builder
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def sizes(self, swaps: frozenset[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(text tokens, regions) of each item of an Oscar-style example: its first text
        segment with its first image's tags, and that image's regions. Exact for one-text
        examples without `swaps` (an upper bound otherwise); a task whose items differ
        overrides it."""
        words = self.corpus.lengths[self.indices]
        images = [self.corpus.get(int(i))["images"][0] for i in self.indices]
        regions, tags = self.builder.image_sizes(images)
        if not self.with_tags:
            tags = np.zeros_like(tags)
        if len(words):
            self.bound_swaps(words, tags, regions, self.swaps if swaps is None else swaps)
        return self.builder.text_lengths(words, tags, self.max_text_len), regions

    def bound_swaps(self, words: np.ndarray, tags: np.ndarray, regions: np.ndarray,
                    swaps: frozenset[str]) -> None:
        """Raise, in place, each part an item may take from another example (`swaps`) to the
        dataset's largest."""
        for part, values in (("words", words), ("tags", tags), ("image", regions)):
            if part in swaps or (part == "tags" and "image" in swaps):
                values[:] = values.max()

    def units(self) -> np.ndarray:
        """[N, 2]: the text tokens and regions each item brings to its padded batch (a batch
        pads each part to its own maximum), for length-bucketed batches (`data.buckets`)."""
        return np.stack(self.sizes(), 1)

    def lengths(self) -> np.ndarray:
        """Input units (text tokens + regions) of each item."""
        return self.units().sum(1)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def other_example(self, rng: np.random.Generator, image: str) -> dict:
        """A random example of a different image (10 tries, as in the Oscar code)."""
        ex = {}
        for _ in range(10):
            ex = self.corpus.get(int(self.indices[rng.integers(len(self.indices))]))
            if ex["images"][0] != image:
                break
        return ex

    @staticmethod
    def item(text: Any, img: ImageInput, **fields: Any) -> dict:
        return {"ids": text.ids, "types": text.types, "feats": img.feats, "pos": img.pos,
                **fields}
