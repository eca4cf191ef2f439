"""The one place that talks to rich: logging, progress bars and tables, on the main process only."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
out = Console()  # results (tables) go to stdout, logs and bars to stderr


def is_main_process() -> bool:
    """True on the process that should log and draw bars (rank 0 under accelerate/torchrun)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def setup_logging(verbose: bool = False) -> None:
    """Route library logging through rich; quiet the chatty third-party loggers."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process():
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for name in ("transformers", "accelerate", "urllib3", "filelock", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)


def progress(total: int | None = None, description: str = "", disable: bool = False) -> Progress:
    """A rich progress bar that stays silent on every process but the main one."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not is_main_process(),
        transient=False,
    )


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar (main process only)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
