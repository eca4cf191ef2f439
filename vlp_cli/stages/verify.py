"""vlp verify: read every record of a store (or a checkpoint's files) and say what is damaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.stores.verify import verify_store


def run(path: Path, as_json: bool = False) -> tuple[bool, str]:
    """(whether everything checked out, the report as text or JSON)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "meta.json").is_file():
        return _checkpoint(path, as_json)
    report = verify_store(path)
    if as_json:
        return report.ok, json.dumps(report.to_dict(), indent=2)
    return report.ok, "\n".join(report.lines())


def _checkpoint(path: Path, as_json: bool) -> tuple[bool, str]:
    """Hand a checkpoint to `checkpoint.verify_checkpoint`, where this vlp has one."""
    from vlp_cli import checkpoint

    check = getattr(checkpoint, "verify_checkpoint", None)
    if check is None:
        raise VlpError(f"{path} is a checkpoint: verifying checkpoints is not supported yet by "
                       "this vlp (it verifies feature stores and corpora)")
    result: Any = check(path)
    if result is None:  # a checker that raises on damage and returns nothing otherwise
        return True, f"checkpoint {path}: OK"
    data = result.to_dict() if hasattr(result, "to_dict") else result
    ok = getattr(result, "ok", None)
    if ok is None and isinstance(data, dict):
        ok = data.get("ok", not data.get("damaged"))
    if as_json or not hasattr(result, "lines"):
        text = json.dumps(data, indent=2, default=str) if isinstance(data, dict) else str(data)
    else:
        text = "\n".join(result.lines())
    return bool(ok), text
