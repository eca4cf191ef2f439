"""UNITER's masked region classification: cross-entropy to the detector's top class of each
masked region (words whole). The region classifier is shared with MRC-kl (mrckl.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlp_cli.tasks.base import Stats, count_stat, mean_stat
from vlp_cli.tasks.masking import MaskedObjective, own_classes, region_states

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel
    from vlp_cli.tasks.base import Context


def region_classifier(task: MaskedObjective, ctx: Context) -> list[HeadSpec]:
    from vlp_cli.model import HeadSpec

    return [HeadSpec("region_cls", "regions", len(task.labels(ctx)))]


class Mrc(MaskedObjective):
    name = "mrc"
    help = "UNITER: masked region classification (detector's top class), words whole"
    metrics = ("mrc_acc",)
    report = ("mrc_acc",)
    needs_classes = True

    def heads(self, ctx: Context) -> list[HeadSpec]:
        return region_classifier(self, ctx)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        hidden = region_states(model, batch)
        logits = own_classes(
            model.region_outputs("region_cls", hidden, batch["region_masked"]).float(), batch)
        target = batch["region_targets"]  # [M], -100 where the region has no class
        valid = target != -100
        n = int(valid.sum())
        loss = F.cross_entropy(logits, target, ignore_index=-100) if n else logits.sum() * 0
        correct = (logits.argmax(-1) == target)[valid].sum()
        return loss, {"loss": mean_stat(loss, n), "mrc_loss": mean_stat(loss, n),
                      "mrc_acc": count_stat(correct, n)}


TASK = Mrc()
