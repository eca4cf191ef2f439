"""Output paths: refused before any work when they cannot be written, and no empty folder left
behind by a run that fails.

    check_writable(out)                     # a directory output: raises VlpError, creates nothing
    check_writable(out / "m.json", file=True)  # a file output: its folder must be writable
    with output_dir(out):                   # creates `out`; removes it again if the block
        ...                                 # raises while it is still empty

A stage that refuses its inputs after `output_dir` has made the folder leaves nothing behind;
a stage that had written something keeps it (an extraction resumes from it).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlp_cli import VlpError


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, *, file: bool = False, what: str = "--out") -> Path:
    """Refuse an output that cannot be written, before any work starts; create nothing.

    Args:
        path: the output directory (or file, with `file=True`); it need not exist yet.
        file: `path` names a file: it must not be a folder, and its folder must be writable.
        what: how the message names the option (e.g. "--out").

    Returns:
        `path`, as a Path.

    Raises:
        VlpError: naming the path and what to do, when a folder on the way is a file, the
            target is a folder where a file is meant (or the reverse), or the nearest existing
            folder cannot be written (permissions, a read-only file system).
    """
    path = Path(path)
    if file and path.is_dir():
        raise VlpError(f"{what} {path} is a folder: pass a file path")
    if not file and path.exists() and not path.is_dir():
        raise VlpError(f"{what} {path} is a file: pass a folder path")
    if path.exists() and not os.access(path, os.W_OK):
        raise VlpError(f"{what} {path} cannot be written (permission denied or a read-only "
                       "file system): choose another location")
    folder = _nearest_existing(path.parent if file else path)
    if not folder.is_dir():
        raise VlpError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        # A real write, not just os.access: ACLs, full disks and read-only mounts all show here.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = {errno.EROFS: "a read-only file system", errno.ENOSPC: "no space left",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(
            exc.errno, exc.strerror or str(exc))
        raise VlpError(f"{what} {path} cannot be written: {folder} is not writable ({reason}); "
                       "choose another location") from None
    return path


@contextmanager
def output_dir(path: str | Path, *, create: bool = True, what: str = "--out") -> Iterator[Path]:
    """Check `path` is writable, create it (and missing parents) when `create`, and, if the
    block raises while the folders made here are still empty, remove them again.

    A folder that existed before is never removed, nor one that holds anything when the
    block fails. With `create=False` the block (e.g. a stage) makes the folder itself; it is
    still removed when it is empty on failure.

    Yields:
        `path`, as a Path.
    """
    path = Path(path)
    check_writable(path, what=what)
    made: list[Path] = []
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    if create:
        path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:  # innermost first
            try:
                folder.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise
