"""UNITER's masked language modelling: 15% of the word pieces (80/10/10) predicted from the
other words and the whole image (conditional masking; see masking.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlp_cli.tasks.base import Stats, mean_stat, masked_tokens
from vlp_cli.tasks.masking import MaskedObjective, region_states

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel
    from vlp_cli.tasks.base import Context


class Mlm(MaskedObjective):
    name = "mlm"
    help = "UNITER: masked language modelling, regions whole"
    metrics = ("mlm_acc",)
    report = ("mlm_acc",)
    scores_text = True

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        # The same head as Oscar's masked tokens: mixed, the two objectives share it.
        return [HeadSpec("mlm", "masked_tokens", init="bert_mlm")]

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        hidden = region_states(model, batch)
        loss, stats = masked_tokens(model, hidden, batch["mlm_labels"])
        stats["loss"] = mean_stat(loss, batch["input_ids"].shape[0])
        return loss, stats


TASK = Mlm()
