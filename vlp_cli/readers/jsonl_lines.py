"""Reading JSONL that users hand in: every bad line is an error naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vlp_cli import VlpError


def iter_jsonl(path: Path, what: str = "file",
               require: str | None = "image") -> Iterator[tuple[str, dict]]:
    """Yield (`"FILE line N"`, record) for each non-empty line holding a JSON object with a
    `require` string field (vlp's own lines: 'image'; None: any object).

    Bytes are split, not decoded text: str.splitlines also breaks at U+2028, U+0085 and other
    characters that JSON strings may hold unescaped. A UTF-8 BOM is tolerated.
    """
    path = Path(path)
    if not path.is_file():
        raise VlpError(f"{what} {path} not found")
    for n, blob in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path} line {n}"
        try:
            line = blob.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            raise VlpError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VlpError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise VlpError(f"{where}: not a JSON object")
        if require is not None and not isinstance(rec.get(require), str):
            what_field = "the image key" if require == "image" else "a string"
            raise VlpError(f"{where}: needs the '{require}' field, {what_field}")
        yield where, rec
