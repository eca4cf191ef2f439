"""Batches by input units (UNITER's length buckets): a budget of positions, not of examples.

A fixed batch of B examples is padded to its longest member; with captions of 8 to 30 tokens
and 10 to 100 regions most of it is padding. UNITER instead shuffles, cuts the order into
buckets of `bucket_size` examples, sorts each bucket by length and fills a batch until
(longest member) x (count) would exceed `max_units`: batches of short examples hold many,
batches of long ones few, and each is padded only to lengths close to its members'.

`BucketBatches` follows `streams.EpochBatches`'s protocol (`set_position`, `per_rank`,
`__len__`, `__iter__` of index lists), so the training loop's `Stream` takes it unchanged and
a saved (epoch, position) still resumes exactly: the batches of an epoch come from
(seed, epoch) alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from vlp_cli import VlpError

logger = logging.getLogger(__name__)

# Batch sizes are rounded down to a multiple of this (when at least this many fit), as in
# UNITER: tensor-core and vectorised kernels like multiples of 8.
MULTIPLE = 8


def bucket_batches(lengths: np.ndarray, max_units: int, bucket_size: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches (arrays of indices into `lengths`), in a shuffled order.

    `lengths` is [N] (input units of each example) or [N, parts] (e.g. text tokens and
    regions, which a batch pads separately: its padded size is count x the sum of each part's
    maximum). Within a bucket the examples are sorted longest first and a batch takes as many
    as fit the budget, rounded down to a multiple of 8 when at least 8 fit (one example when
    even one does not). With [N] lengths that is `max_units // length of the first`, as in
    UNITER. The last batch of a bucket holds what is left of it.

    With several parts, sorting by the total would put (40 regions, 10 words) beside (10
    regions, 40 words) and pad both to 80. The order is instead `snake_order`: by the part
    that varies most, and within each of its values by the rest, alternately up and down, so
    that neighbours are close in every part (COCO-like lengths: 14% padded -> 4%).
    """
    lengths = np.asarray(lengths)
    parts = lengths if lengths.ndim == 2 else lengths[:, None]
    total = parts.sum(1)
    order = rng.permutation(len(total))
    batches: list[np.ndarray] = []
    for lo in range(0, len(order), bucket_size):
        bucket = order[lo:lo + bucket_size]
        # Longest first, stable: ties keep the shuffled order.
        bucket = bucket[snake_order(parts[bucket])]
        p = 0
        while p < len(bucket):
            # Padded size of a batch ending at each next example: count x sum of the maxima.
            ahead = parts[bucket[p:p + max(max_units, 1)]]
            padded = np.maximum.accumulate(ahead, axis=0).sum(1) * np.arange(1, len(ahead) + 1)
            fit = max(int(np.searchsorted(padded, max_units, side="right")), 1)
            count = fit - fit % MULTIPLE if fit >= MULTIPLE else fit
            batches.append(bucket[p:p + count])
            p += count
    return [batches[i] for i in rng.permutation(len(batches))]


def snake_order(parts: np.ndarray) -> np.ndarray:
    """A stable order of [n, parts] lengths, longest first: one part alone by its value; else
    by the part of the widest range, descending, and within each of its values by the sum of
    the others, descending and ascending in turn (a boustrophedon), so that a run of
    neighbours stays close in every part, across group boundaries too."""
    if parts.shape[1] == 1:
        return np.argsort(-parts[:, 0], kind="stable")
    main = int(np.argmax(parts.max(0) - parts.min(0)))
    key = parts[:, main]
    rest = parts.sum(1) - key
    _, group = np.unique(-key, return_inverse=True)  # 0 for the longest value, 1 next...
    turn = np.where(group % 2 == 0, -1, 1)
    return np.lexsort((turn * rest, -key))


class BucketBatches(Sampler[list[int]]):
    """This process's length-bucketed batches of one epoch, from a position inside it.

    Every process builds the same list of batches from (seed, epoch) and takes every
    `world`-th one (`rank`, `rank + world`, ...), so processes see distinct examples. Each
    takes the same number of batches, a multiple of `grad_accum` (the remainder of the epoch
    is dropped): an epoch holds whole accumulation windows on every process, and `per_rank`
    is defined (UNITER's sampler has no length). It may differ by a batch or two between
    epochs; it is that of the epoch set by `set_position`.

    Args:
        lengths: input units of each dataset item, [N] or [N, parts] (text tokens, regions:
            `TaskDataset.units()`).
        max_units: the budget: a batch's padded size (count x the sum of its parts' maxima)
            stays within it.
        seed, rank, world, grad_accum: as `streams.EpochBatches`.
        bucket_size: examples sorted together (UNITER: 8192).
    """

    def __init__(self, lengths: np.ndarray, max_units: int, seed: int, rank: int, world: int,
                 grad_accum: int, bucket_size: int = 8192):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        total = self.lengths.sum(1) if self.lengths.ndim == 2 else self.lengths
        if len(total) and int(total.max()) > max_units:
            raise ValueError(f"the longest example has {int(total.max())} input units, "
                             f"more than max_units={max_units}")
        self.max_units, self.bucket_size = int(max_units), int(bucket_size)
        self.seed, self.rank, self.world, self.grad_accum = seed, rank, world, grad_accum
        self.epoch, self.start = 0, 0
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Every process's batches of an epoch, in order (built once per epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached = (epoch, bucket_batches(self.lengths, self.max_units,
                                                  self.bucket_size, rng))
        return self._cached[1]

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Batches per epoch on this process (the epoch of `set_position`)."""
        n = len(self.batches(self.epoch))
        return n // self.world // self.grad_accum * self.grad_accum

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        for i in range(self.start, self.per_rank):
            yield batches[i * self.world + self.rank].tolist()


def units_sampler(name: str, dataset: Any, cfg: Any, seed: int, rank: int, world: int,
                  cfg_key: str) -> BucketBatches:
    """Length buckets over a task dataset's `units()` under `cfg` (a TrainCfg with
    `batching: units`), with one clear line when they cannot be built."""
    if not hasattr(dataset, "units"):
        raise VlpError(f"{cfg_key}.batching 'units' needs the lengths of {name}'s examples, "
                       "which its dataset does not give; use batching 'fixed'")
    units = dataset.units()  # [N, 2]: text tokens, regions (padded separately)
    lengths = units.sum(1)
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > cfg.max_units:
        raise VlpError(f"{cfg_key}.max_units ({cfg.max_units}) is less than the longest "
                       f"{name} example ({longest} input units: text tokens + regions); "
                       f"raise it to at least {longest} (UNITER: 10240)")
    logger.info("%s: batches of at most %d input units (examples of %d to %d, mean %.1f)",
                name, cfg.max_units, int(lengths.min()) if len(lengths) else 0, longest,
                float(lengths.mean()) if len(lengths) else 0.0)
    return BucketBatches(units, cfg.max_units, seed, rank, world, cfg.grad_accum,
                         cfg.bucket_size)
