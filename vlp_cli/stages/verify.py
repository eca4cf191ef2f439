"""vlp verify: read every record of a store, or every file of a checkpoint or training state,
and say what is damaged."""

from __future__ import annotations

import json
from pathlib import Path

from vlp_cli.stores.verify import verify_store


def run(path: Path, as_json: bool = False) -> tuple[bool, str]:
    """(whether everything checked out, the report as text or JSON).

    Damage in a checkpoint or training state raises VlpError naming the file.
    """
    from vlp_cli import checkpoint, runstate

    path = Path(path)
    if checkpoint.is_checkpoint(path):
        data = checkpoint.verify_checkpoint(path)
    elif (path / runstate.TRAINER).is_file() and (path / runstate.MANIFEST).is_file():
        manifest = runstate.check_manifest(path, f"training state {path}")
        data = {"kind": "training state", "path": str(path),
                "files_checked": len(manifest["files"]), "ok": True}
    else:
        report = verify_store(path)
        if as_json:
            return report.ok, json.dumps(report.to_dict(), indent=2)
        return report.ok, "\n".join(report.lines())
    if as_json:
        return True, json.dumps(data, indent=2)
    lines = [f"{data['kind']} {path}"]
    lines += [f"  {k.replace('_', ' ')}: {v}" for k, v in data.items()
              if k not in ("kind", "path", "ok")]
    return True, "\n".join(lines + ["OK"])
