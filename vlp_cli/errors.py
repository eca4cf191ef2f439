"""A user's mistake in one line: exceptions a user causes (a missing or unwritable path, a
corrupt JSON or LMDB file) turned into the message the CLI prints instead of a traceback.

Anything not recognised here is a bug and keeps its traceback; `vlp --debug` shows the
traceback of everything.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import TracebackType

from vlp_cli import VlpError

_REASONS = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}


def _within(filename: str, paths: list[Path]) -> bool:
    """`filename` is one of the user's paths or lies inside one."""
    target = Path(os.path.abspath(filename))
    for p in paths:
        p = Path(os.path.abspath(p))
        if target == p or p in target.parents:
            return True
    return False


def _json_file(tb: TracebackType | None) -> str | None:
    """The file a JSON decode error came from: the innermost frame holding a path-like local
    named like one (the readers call them path, file, src, source...)."""
    found = None
    while tb is not None:
        for name in ("path", "file", "src", "source", "filename", "fname", "meta_path"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, Path) or (isinstance(value, str) and
                                           value.endswith((".json", ".jsonl", ".tsv"))):
                found = str(value)
                break
        tb = tb.tb_next
    return found


def worker_message(message: str) -> str:
    """The user's line inside a VlpError re-raised from a DataLoader worker.

    torch re-raises a worker's exception as the same class whose message is the whole worker
    traceback ("Caught VlpError in DataLoader worker process 0. Original Traceback ...");
    the line that matters is the last, after the class name.
    """
    if message.startswith("Caught ") and "Original Traceback" in message:
        tail = message.rstrip().splitlines()[-1]
        return tail.split("VlpError: ", 1)[1] if "VlpError: " in tail else tail
    return message


def user_message(exc: BaseException, user_paths: list[Path]) -> str | None:
    """One line for an exception a user caused, or None for a bug (keep the traceback).

    Args:
        exc: the exception that escaped a command.
        user_paths: the paths the user passed (arguments and options): a missing file inside
            one of them is the user's; one elsewhere (a package file) is a bug.
    """
    if isinstance(exc, VlpError):
        return worker_message(str(exc))
    name = getattr(exc, "filename", None)
    if isinstance(exc, IsADirectoryError):
        return f"{name} is a folder, where a file is expected: pass a file path"
    if isinstance(exc, NotADirectoryError):
        return f"{name}: a file is in the way where a folder is expected"
    if isinstance(exc, FileNotFoundError) and name and _within(str(name), user_paths):
        return f"{name} does not exist (or was removed while vlp ran)"
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        where = f"{name}: " if name else ""
        return (f"{where}{_REASONS[exc.errno]}: check that path's permissions and free "
                "space, or choose another location")
    if isinstance(exc, json.JSONDecodeError):
        where = _json_file(exc.__traceback__)
        what = f"{where} is" if where else "an input file is"
        return (f"{what} not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
                + ("" if where else "; run with --debug to see which"))
    if type(exc).__module__.split(".")[0] == "lmdb":
        # lmdb is imported only in stores/; its errors are recognised by module name.
        return (f"{exc} (lmdb {type(exc).__name__}): not a complete, readable vlp store; "
                "check the path, or rebuild the store")
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({exc.reason}); run with --debug to see which"
    return None
