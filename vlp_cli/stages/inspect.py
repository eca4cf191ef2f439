"""vlp inspect: describe any artifact vlp writes (feature store, corpus, checkpoint, metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.stores.lmdb_env import LazyReader, is_lmdb_dir


def describe(path: Path) -> dict:
    """A JSON-able description of `path`, whatever vlp artifact it is."""
    from vlp_cli import checkpoint

    path = Path(path)
    if not path.exists():
        raise VlpError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".json":
        try:
            return {"kind": "metrics", "path": str(path), **json.loads(path.read_text())}
        except json.JSONDecodeError as exc:
            raise VlpError(f"{path}: not valid JSON ({exc.msg})")
    if path.is_file() and path.suffix == ".jsonl":
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        try:
            first = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError as exc:
            raise VlpError(f"{path} line 1: not valid JSON ({exc.msg})")
        return {"kind": "records (JSONL)", "path": str(path), "records": len(lines),
                "first": first}
    if checkpoint.is_checkpoint(path):
        return checkpoint.describe(path)
    from vlp_cli import runstate

    if (path / runstate.TRAINER).is_file() and (path / runstate.MANIFEST).is_file():
        return runstate.describe_state(path)
    from vlp_cli.stores.features import store_parts

    parts = store_parts(path) if path.is_dir() else []  # one LMDB, or a folder of shards
    if parts:
        meta = LazyReader(parts[0]).meta("store") or {}
        schema = meta.get("schema")
        if schema == "vlp.features":
            from vlp_cli.config import DataCfg
            from vlp_cli.stores.features import FeatureStore

            # Describing is reading: an unfinished store is shown as it is (complete: false).
            store = FeatureStore(path, allow_incomplete=True, warn=False)
            info = store.describe(DataCfg().conf_th)
        elif schema == "vlp.corpus" and is_lmdb_dir(path):
            from vlp_cli.stores.corpus import Corpus

            info = Corpus(path).describe()
        else:
            raise VlpError(f"{path} is an LMDB store vlp did not write (schema {schema!r})")
        recipe = path / "recipe.yaml"
        info["recipe"] = str(recipe) if recipe.is_file() else None
        return info
    raise VlpError(f"{path} is not a vlp feature store, corpus or checkpoint directory")


def show(info: dict) -> None:
    """Print a description as a rich tree."""
    from rich.tree import Tree

    from vlp_cli.console import out

    tree = Tree(f"[bold]{info.get('kind')}[/] {info.get('path')}")

    def add(node: Tree, value: Any, key: str) -> None:
        if isinstance(value, dict):
            branch = node.add(f"[cyan]{key}[/]")
            for k, v in value.items():
                add(branch, v, str(k))
        elif isinstance(value, list) and len(value) > 12:
            node.add(f"[cyan]{key}[/]: {value[:12]} ... ({len(value)} items)")
        else:
            node.add(f"[cyan]{key}[/]: {value}")

    for k, v in info.items():
        if k not in ("kind", "path"):
            add(tree, v, k)
    out.print(tree)
