"""One forward step per task: the model call, the loss, and the statistics to log.

Each step returns `(loss, stats)` where stats maps a name to a (sum, count) pair of tensors;
the training loop adds them up over steps and processes before dividing, so held-out numbers
are exact under any batching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlp_cli.losses import classification_loss, masked_token_loss, vqa_bce
from vlp_cli.model import VLPModel

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[VLPModel, dict], tuple[torch.Tensor, Stats]]

INPUTS = ("input_ids", "token_type_ids", "text_mask", "img_feats", "img_pos", "img_mask")


def encode(model: VLPModel, batch: dict) -> torch.Tensor:
    return model(*(batch[k] for k in INPUTS), attn_mask=batch.get("attn_mask"))


def _mean(value: torch.Tensor, n: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.as_tensor(n, dtype=torch.float32, device=value.device)
    return value.detach().float() * n, n


def _masked_tokens(model: VLPModel, hidden: torch.Tensor, labels: torch.Tensor,
                   smoothing: float = 0.0) -> tuple[torch.Tensor, Stats]:
    text = hidden[:, : labels.shape[1]]
    where = labels != -100  # [B, T]
    logits = model.mlm_logits(text, where)  # [M, V]
    target = labels[where]
    loss = masked_token_loss(logits, target, smoothing)
    correct = (logits.argmax(-1) == target).sum().float()
    n = torch.as_tensor(float(target.numel()), device=hidden.device)
    return loss, {"mlm_loss": _mean(loss, n), "mlm_acc": (correct, n)}


def pretrain_step(contrast_weight: float = 1.0) -> Step:
    """Oscar: masked token loss over words and tags + contrastive loss on [CLS]."""

    def step(model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        hidden = encode(model, batch)
        mlm, stats = _masked_tokens(model, hidden, batch["mlm_labels"])
        logits = model.contrast_logits(hidden)
        con = classification_loss(logits, batch["contrast"])
        b = logits.shape[0]
        stats["contrast_loss"] = _mean(con, b)
        stats["contrast_acc"] = ((logits.argmax(-1) == batch["contrast"]).sum().float(),
                                 torch.as_tensor(float(b), device=logits.device))
        loss = mlm + contrast_weight * con
        stats["loss"] = _mean(loss, b)
        return loss, stats

    return step


def vqa_step(model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
    hidden = encode(model, batch)
    logits = model.vqa_logits(hidden)
    loss = vqa_bce(logits, batch["vqa_targets"])
    b = logits.shape[0]
    # The score the top answer earns: exact VQA accuracy when targets are the official scores.
    top = batch["vqa_targets"].gather(1, logits.argmax(-1, keepdim=True)).sum()
    n = torch.as_tensor(float(b), device=logits.device)
    return loss, {"loss": _mean(loss, b), "vqa_score": (top.detach().float(), n)}


def retrieval_step(model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
    hidden = encode(model, batch)
    logits = model.match_logits(hidden)
    loss = classification_loss(logits, batch["match"])
    b = logits.shape[0]
    acc = (logits.argmax(-1) == batch["match"]).sum().float()
    n = torch.as_tensor(float(b), device=logits.device)
    return loss, {"loss": _mean(loss, b), "match_acc": (acc, n)}


def caption_step(label_smoothing: float = 0.0) -> Step:
    def step(model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        hidden = encode(model, batch)
        loss, stats = _masked_tokens(model, hidden, batch["mlm_labels"], label_smoothing)
        stats["loss"] = stats["mlm_loss"]
        return loss, stats

    return step
