"""UNITER's MRC-kl: the masked regions' predicted class distribution pulled towards the
detector's (KL(detector || model)), words whole. Shares the region classifier with mrc.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlp_cli.tasks.base import Stats, count_stat, mean_stat
from vlp_cli.tasks.masking import MaskedObjective, own_classes, region_states
from vlp_cli.tasks.mrc import region_classifier

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel
    from vlp_cli.tasks.base import Context


class Mrckl(MaskedObjective):
    name = "mrckl"
    help = "UNITER: masked region classification by KL to the detector's class distribution"
    metrics = ("mrckl_kl", "mrc_acc")
    report = ("mrckl_kl", "mrc_acc")
    needs_classes = True
    needs_probs = True

    def heads(self, ctx: Context) -> list[HeadSpec]:
        return region_classifier(self, ctx)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        hidden = region_states(model, batch)
        logits = own_classes(
            model.region_outputs("region_cls", hidden, batch["region_masked"]).float(), batch)
        target = batch["soft_targets"].float()  # [M, C], the detector's distribution
        logp = F.log_softmax(logits, -1)
        # KL(target || model) per element, as F.kl_div(log q, p) computes it; UNITER's code
        # averages it over every element (regions x classes) for the training loss.
        kl = F.kl_div(logp, target, reduction="none")  # [M, C]
        m = target.shape[0]
        loss = kl.mean() if m else logits.sum() * 0
        per_region = kl.sum(-1).mean() if m else loss.detach()
        # Accuracy over the regions with a class distribution (a store without one gives
        # all-zero rows, whose argmax would match anything's 0).
        has = target.sum(-1) > 0
        correct = (logits.argmax(-1) == target.argmax(-1))[has].sum()
        return loss, {"loss": mean_stat(loss, m), "mrckl_kl": mean_stat(per_region, m),
                      "mrc_acc": count_stat(correct, int(has.sum()))}


TASK = Mrckl()
