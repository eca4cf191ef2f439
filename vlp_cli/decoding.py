"""Caption decoding, Oscar's way: append [MASK], predict it, repeat until [SEP].

The caption segment is laid out exactly as in training (`CaptionDataset.build`): tags and
regions sit at fixed positions after a caption segment of fixed length, and the causal mask
keeps each caption position blind to the ones after it, so the [SEP] that `build` appends
after the [MASK] is never seen by it.
"""

from __future__ import annotations

from typing import Any

import torch

from vlp_cli.data.datasets import CaptionDataset, Collator
from vlp_cli.data.examples import ImageInput
from vlp_cli.model import VLPModel
from vlp_cli.tasks import encode


@torch.no_grad()
def greedy_captions(model: VLPModel, dataset: CaptionDataset, images: list[ImageInput],
                    tokenizer: Any, batch_size: int = 32,
                    device: torch.device | None = None) -> list[str]:
    """Greedy decoding of one caption per image (max `captioning.max_caption_len` pieces)."""
    model.eval()
    device = device or next(model.parameters()).device
    b = dataset.builder
    collate = Collator(b.pad_id)
    # Never emit padding, [CLS], [MASK] or [UNK]; [SEP] ends the caption.
    banned = torch.tensor(sorted(b.special_ids - {b.sep_id}), dtype=torch.long)
    out: list[str] = []
    max_len = dataset.cfg.max_caption_len
    for start in range(0, len(images), batch_size):
        chunk = images[start: start + batch_size]
        words: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for t in range(max_len):
            items = [dataset.build(w + [b.mask_id], img)[0] for w, img in zip(words, chunk)]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            hidden = encode(model, batch)
            where = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=device)
            where[:, 1 + t] = True  # the [MASK] after t words
            logits = model.mlm_logits(hidden[:, : where.shape[1]], where)  # [B, V]
            logits[:, banned.to(device)] = float("-inf")
            pred = logits.argmax(-1).tolist()
            for i, p in enumerate(pred):
                if done[i]:
                    continue
                if p == b.sep_id:
                    done[i] = True
                else:
                    words[i].append(int(p))
            if all(done):
                break
        out.extend(tokenizer.decode(w, skip_special_tokens=True).strip() for w in words)
    return out
