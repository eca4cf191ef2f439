"""What the training loop draws batches from, and how it stops on a signal.

`EpochBatches` cuts one task's data into this process's batches of an epoch, from a position
inside it; a `Stream` is one task's endless batch source over epochs (the data order comes
from (seed, epoch) alone, so a saved (epoch, position) is all a resumed run needs).
`StopRequest` turns SIGTERM / SIGINT into a flag the loop reads once per optimiser step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlp_cli import VlpError, faults

logger = logging.getLogger(__name__)


class EpochBatches(Sampler[list[int]]):
    """This process's batches of one epoch, from a position inside it.

    The order is a permutation drawn from (seed, epoch) alone (the draws torch's RandomSampler
    makes under a DataLoader with a generator seeded `seed + epoch`), cut into full batches;
    process `rank` of `world` takes every `world`-th batch, as Accelerate's sharded loaders do.
    An epoch holds a whole number of accumulation windows, so a saved position (always at an
    optimiser step) is all a resumed run needs to continue the same sequence.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int,
                 grad_accum: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.per_rank = (n // batch_size) // world // grad_accum * grad_accum
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's base-seed draw
        perm = torch.randperm(self.n, generator=g).tolist()
        bs = self.batch_size
        for i in range(self.start, self.per_rank):
            b = i * self.world + self.rank
            yield perm[b * bs: (b + 1) * bs]


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop reads once per optimiser step: the run saves
    its state and stops there. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving the training state after this step, then "
                       "stopping (Ctrl-C again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class Interrupted(VlpError):
    """The run stopped on a signal after saving its state."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Stream:
    """One task's batches, epoch after epoch, for this process.

    `sampler` defaults to `EpochBatches`; any batch sampler with `set_position(epoch, start)`
    and `per_rank` (batches per epoch on this process) plugs in (a length-bucket sampler).
    """

    def __init__(self, dataset: Dataset, collate: Callable, batch_size: int, seed: int,
                 rank: int, world: int, grad_accum: int, num_workers: int = 0,
                 sampler: Any | None = None):
        self.dataset, self.seed = dataset, seed
        self.sampler = sampler or EpochBatches(len(dataset), batch_size, seed, rank, world,
                                               grad_accum)
        # The loader's own generator only seeds worker processes; without one, every new
        # iterator would draw from torch's global RNG, and a resumed run would see other
        # dropout masks.
        self.gen = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                                 num_workers=num_workers, generator=self.gen)
        self.epoch, self.position = 0, 0
        self._it: Iterator | None = None

    @property
    def per_rank(self) -> int:
        return self.sampler.per_rank

    def restore(self, epoch: int, position: int) -> None:
        # A length-bucket sampler's batch count depends on the epoch: ask it for this one.
        self.sampler.set_position(epoch, position)
        if position >= self.per_rank:
            epoch, position = epoch + 1, 0
        self.epoch, self.position, self._it = epoch, position, None

    def next(self) -> Any:
        while True:
            if self._it is None:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                self.sampler.set_position(self.epoch, self.position)
                self.gen.manual_seed(self.seed + self.epoch)
                faults.point("epoch:start")
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                faults.point("epoch:end")
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch
