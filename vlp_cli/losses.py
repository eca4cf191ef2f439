"""Objectives as plain tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the masked positions only: logits [M, V], labels [M]."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Oscar's [CLS] heads (contrastive, matched/unmatched): softmax cross-entropy."""
    return F.cross_entropy(logits.float(), labels)
