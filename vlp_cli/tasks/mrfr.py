"""UNITER's masked region feature regression: the masked regions' input features (zeroed in
the input) regressed through a layer tied to the image embedding's feature Linear, L2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlp_cli.tasks.base import Stats, mean_stat
from vlp_cli.tasks.masking import MaskedObjective, region_states

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel
    from vlp_cli.tasks.base import Context


class Mrfr(MaskedObjective):
    name = "mrfr"
    help = "UNITER: masked region feature regression (L2), words whole"
    metrics = ("mrfr_l2",)
    report = ("mrfr_l2",)

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec("mrfr", "features", ctx.builder.features.feature_dim)]

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        hidden = region_states(model, batch)
        pred = model.region_outputs("mrfr", hidden, batch["region_masked"]).float()  # [M, F]
        target = batch["feat_targets"].float()
        m = target.shape[0]
        # UNITER's code averages the squared error over every element of the masked regions;
        # its validation reports the same number (summed, / feature size / regions). A batch
        # without a masked region (images without boxes) gives a zero loss, not NaN.
        loss = F.mse_loss(pred, target) if m else pred.sum() * 0
        return loss, {"loss": mean_stat(loss, m), "mrfr_l2": mean_stat(loss, m)}


TASK = Mrfr()
