"""Named fault-injection points, for the tests that kill a run at a chosen moment.

`VLP_FAULT=NAME[@N]` makes the N-th arrival (default: the first) at `point(NAME)` kill this
process with SIGKILL, exactly as an out-of-memory killer or a pre-empted node would: no
`finally`, no atexit, no flush. Unset, a point costs one dictionary lookup. Timing-based kills
drift by 3x on shared machines; named points make every moment of a save reachable.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_target: tuple[str, int] | None = None
_read = False


def _parse() -> tuple[str, int] | None:
    spec = os.environ.get("VLP_FAULT", "").strip()
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    return name, int(nth or 1)


def point(name: str) -> None:
    """Die here if VLP_FAULT names this point (and this is its N-th arrival)."""
    global _target, _read
    if not _read:
        _target, _read = _parse(), True
    if _target is None or _target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
