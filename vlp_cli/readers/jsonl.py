"""vlp's own JSONL: `[SPLIT=]FILE.jsonl`, one caption or question per line.

    {"image": key, "caption": "..."}
    {"image": key, "question": "...", "answers": ["...", ...], "question_id": optional}

A line's own "split" field wins over the `SPLIT=` prefix (default train). `answers` lists what
each annotator answered (VQA v2: ten people), not alternative correct answers. Blank captions
and questions are dropped with a logged count.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.jsonl_lines import iter_jsonl
from vlp_cli.stores.corpus import SPLITS

logger = logging.getLogger(__name__)

NAME = "jsonl"
SOURCE_HELP = ("`[SPLIT=]FILE.jsonl` with lines {\"image\", \"caption\"} or {\"image\", "
               "\"question\", \"answers\"}")
DETAILS = ("`answers` are annotators' answers, scored as VQA v2 does: an answer given by n of "
           "the N annotators scores the mean, over the N ways of leaving one annotator out, of "
           "min(1, matches among the rest / 3); with ten answers 0.3, 0.6, 0.9 and 1.0 for 1, "
           "2, 3 and 4+ matches. So `[\"pagoda\", \"temple\"]` scores each 0.17, not 1: list "
           "the accepted answer once per annotator, or give a single answer (scored 1 on an "
           "exact match).")


def _split_spec(spec: str) -> tuple[str | None, Path]:
    """(split or None, file) of `[SPLIT=]FILE`; a file whose own name holds '=' also works."""
    if "=" in spec and not Path(spec).is_file():
        split, path_s = spec.split("=", 1)
        if split in SPLITS:
            return split, Path(path_s)
        if split and not any(c in split for c in "/\\."):
            raise VlpError(f"unknown split {split!r} in {spec!r}: use train, val or test")
    return None, Path(spec)


def claims(spec: str) -> bool:
    return _split_spec(spec)[1].suffix.lower() in (".jsonl", ".json") or \
        _split_spec(spec)[1].is_file()


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = _split_spec(spec)
    if not path.is_file():
        raise VlpError(f"source {spec!r}: {path} is not an existing JSONL file")
    out = []
    blank = 0
    for where, rec in iter_jsonl(path, "source"):
        s = rec.get("split", split or "train")
        if s not in SPLITS:
            raise VlpError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {s!r}")
        base = {"split": s, "images": [rec["image"]], "where": where, "source": str(path)}
        if isinstance(rec.get("caption"), str):
            if not rec["caption"].strip():
                blank += 1
                continue
            out.append({**base, "kind": "caption", "texts": [rec["caption"].strip()],
                        "label": None, "id": None})
        elif isinstance(rec.get("question"), str):
            answers = rec.get("answers")
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise VlpError(f"{where}: 'answers' must be a list of strings "
                               "(ten for VQA v2, one for single-answer sets)")
            if not answers:
                raise VlpError(f"{where}: 'answers' is empty: give at least one answer (ten "
                               "for VQA v2, one for single-answer sets)")
            if not rec["question"].strip():
                blank += 1
                continue
            qid = rec.get("question_id", f"{path.stem}-{where.rsplit(' ', 1)[-1]}")
            out.append({**base, "kind": "vqa", "texts": [rec["question"].strip()],
                        "label": answers, "id": qid})
        else:
            raise VlpError(f"{where}: needs a 'caption' or 'question' field (a string)")
    if blank:
        logger.warning("%s: %d blank captions or questions dropped", path, blank)
    return out
