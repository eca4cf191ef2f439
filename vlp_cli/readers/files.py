"""What the JSON-file readers share: `SPLIT=PATH` specs and loading a JSON file with one-line
errors (not a reader: no NAME)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.stores.corpus import SPLITS


def split_spec(spec: str) -> tuple[str | None, Path]:
    """`val=path/file.json` -> ("val", path); a plain path -> (None, path)."""
    split, _, rest = spec.partition("=")
    if rest and split in SPLITS:
        return split, Path(rest)
    return None, Path(spec)


def load_json(path: Path, what: str) -> Any:
    """A JSON file's content; `what` names the file's role in the one-line errors."""
    if not path.is_file():
        raise VlpError(f"{what} {path} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise VlpError(f"{what} {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise VlpError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})"
                       ) from None


def first_line_has(spec: str, suffixes: tuple[str, ...], keys: set[str]) -> bool:
    """Whether a JSON-lines source (by suffix) starts with an object holding `keys`: how
    readers of generically named files (NLVR2's `dev.json`, VCR's `val.jsonl`) claim them."""
    path = split_spec(spec)[1]
    if path.suffix.lower() not in suffixes or not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(first, dict) and keys <= set(first)


def store_key(key: str, template: str, where: str) -> str:
    """An image's feature-store key under `corpus.image_keys` (config.CorpusCfg)."""
    import re

    if template == "{key}":
        return key
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    digits = re.search(r"(\d+)$", stem)
    fields = {"key": key, "stem": stem, "lower": stem.lower()}
    try:
        if "{id" in template:
            if digits is None:
                raise VlpError(f"{where}: image {key!r} has no number at the end of its name "
                               f"for {{id}} in corpus.image_keys {template!r}")
            fields["id"] = int(digits.group(1))
        return template.format(**fields)
    except (KeyError, IndexError) as exc:
        raise VlpError(f"corpus.image_keys {template!r}: {exc!s} is not a field; use {{key}}, "
                       "{stem}, {lower} or {id}") from None
    except ValueError as exc:
        raise VlpError(f"corpus.image_keys {template!r}: not a format string ({exc}); e.g. "
                       "\"{id}\" or \"{lower}.npz\"") from None
