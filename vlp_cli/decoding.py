"""Decoding over a stateful next-token function, independent of any task or model layout.

A decoder is two functions a task provides:

    step(state, tokens) -> (logits [B, V], state)   tokens: the last chosen token per row
                                                    (None at the first step)
    reorder(state, rows) -> state                   keep / repeat rows (beam search)

so that beam search and a key-value cache plug in without another redesign. Greedy decoding
is here; a finished row keeps receiving `end_id` (the step function leaves its prefix as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

StepFn = Callable[[Any, torch.Tensor | None], tuple[torch.Tensor, Any]]


@torch.no_grad()
def greedy(step: StepFn, state: Any, rows: int, max_len: int, end_id: int,
           banned: torch.Tensor | None = None) -> list[list[int]]:
    """The greedy token sequence of each row (without `end_id`), at most `max_len` tokens.

    Args:
        step: the next-token function.
        state: its initial state.
        rows: the batch size.
        max_len: the length budget (tokens, `end_id` excluded).
        end_id: the token that ends a row.
        banned: token ids never chosen (padding, [CLS], [MASK]...).
    """
    words: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    tokens: torch.Tensor | None = None
    for _ in range(max_len):
        logits, state = step(state, tokens)
        if banned is not None and len(banned):
            logits[:, banned.to(logits.device)] = float("-inf")
        pred = logits.argmax(-1).cpu()
        for i, p in enumerate(pred.tolist()):
            if done[i]:
                continue
            if p == end_id:
                done[i] = True
            else:
                words[i].append(int(p))
        if bool(done.all()):
            break
        tokens = torch.where(done, torch.full_like(pred, end_id), pred)
    return words
