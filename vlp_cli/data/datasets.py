"""The one collator that pads batches (the dataset base, `TaskDataset`, is in examples.py).

Every `__getitem__` draws its randomness from a generator seeded by (seed, epoch, index), so a
run is reproducible whatever the number of DataLoader workers. The collator pads what every
task shares (text, regions, masks) to the batch's own longest text and region count; a task
adds its targets through a hook (`Task.collate`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def eval_loader(dataset: Any, **kwargs: Any) -> DataLoader:
    """A DataLoader for held-out passes that leaves the global torch RNG alone.

    Starting to iterate a DataLoader without its own generator draws a worker base seed from the
    global RNG, the one dropout uses: every evaluation inside a training run would shift the
    rest of that run's trajectory, so `eval_every` would change what is trained. Its own
    generator (seeded 0: held-out datasets draw their randomness from their own seeds) keeps a
    run the same whether or how often it evaluates.
    """
    return DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kwargs)


@functools.cache
def _quiet_read_only_views() -> None:
    """Spend torch's once-per-process "array is not writable" warning here, silenced.

    Regions reach the collator as read-only views into the feature store's memory map; torch
    only reads them (`copy_` into the batch), so the warning, which is about writing, does not
    apply.
    """
    ro = np.zeros(1, np.float16)
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(ro)


def rows_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """`dst[...] = src` in one pass, converting the dtype (float16 regions -> float32 batch).

    `src` may be a read-only view into a store. torch's vectorised conversion is ~5x faster
    than numpy's float16 -> float32 `astype` (which, with a copy after it, used to be most of
    a read of a 50 x 2048 record).
    """
    _quiet_read_only_views()
    dst.copy_(torch.from_numpy(src))


class Collator:
    """Pads items into a batch: text [B, T], regions [B, R, F], their masks; then `hook(items,
    batch)` adds the task's own fields. An item that is a list (a matched and an unmatched pair)
    contributes each of its members."""

    def __init__(self, pad_id: int, hook: Callable[[list, dict], None] | None = None):
        self.pad_id = pad_id
        self.hook = hook

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], list):
            items = [x for pair in items for x in pair]
        b = len(items)
        t = max(len(x["ids"]) for x in items)
        r = max(max(len(x["feats"]) for x in items), 1)
        f = items[0]["feats"].shape[1]
        p = items[0]["pos"].shape[1]
        # Text as one tensor from padded lists and the masks from the lengths: a tensor per
        # item and field costs more than the copies themselves at the demo's sizes.
        lens = [len(x["ids"]) for x in items]
        ids = torch.tensor([[*x["ids"], *[self.pad_id] * (t - n)] for x, n in zip(items, lens)],
                           dtype=torch.long)
        types = torch.tensor([[*x["types"], *[0] * (t - n)] for x, n in zip(items, lens)],
                             dtype=torch.long)
        text_mask = torch.arange(t)[None] < torch.tensor(lens)[:, None]
        for i, x in enumerate(items):
            valid = x.get("text_valid")
            if valid is not None:
                text_mask[i, :lens[i]] = torch.as_tensor(valid, dtype=torch.bool)
        feats = torch.zeros((b, r, f), dtype=torch.float32)
        pos = torch.zeros((b, r, p), dtype=torch.float32)
        counts = [len(x["feats"]) for x in items]
        img_mask = torch.arange(r)[None] < torch.tensor(counts)[:, None]
        for i, (x, k) in enumerate(zip(items, counts)):
            if k:
                rows_into(feats[i, :k], x["feats"])
                rows_into(pos[i, :k], x["pos"])
        batch = {"input_ids": ids, "token_type_ids": types, "text_mask": text_mask,
                 "img_feats": feats, "img_pos": pos, "img_mask": img_mask}
        if self.hook is not None:
            self.hook(items, batch)
        return batch
