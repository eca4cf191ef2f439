"""Optimal transport for UNITER's word-region alignment (WRA): IPOT over a padded batch.

UNITER (appendix A.7, Algorithm 1) aligns the text tokens' and the image regions' output
states with the optimal transport distance under a cosine cost, approximated by IPOT (Xie et
al., "A Fast Proximal Point Method for Computing Exact Wasserstein Distance"): beta 0.5,
50 iterations, k = 1, fp32, padding masked, no gradient through the transport plan.

Masks are bool, True at real positions (as `model.py`'s text and image masks). A padded
position carries no mass; the marginals are uniform over the real positions (1/n, 1/m).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cosine similarity of every pair: x [B, N, D], y [B, M, D] -> [B, N, M].

    A zero vector (a padded position's state may be one) gets cost 1 with everything, not NaN.
    """
    x = F.normalize(x, dim=-1, eps=eps)
    y = F.normalize(y, dim=-1, eps=eps)
    return 1 - torch.bmm(x, y.transpose(1, 2))


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, beta: float = 0.5,
         iters: int = 50, k: int = 1) -> torch.Tensor:
    """IPOT's transport plan for a padded batch: cost [B, N, M] -> plan [B, N, M] (fp32).

    Algorithm 1 of UNITER's appendix run on every example of the batch at once: proximal
    point steps with the KL divergence (step size 1/beta), each solved inexactly by `k`
    Sinkhorn-style scaling sweeps. Each column of the plan sums to exactly 1/m (the last
    sweep fixes them); the rows approach 1/n as the iterations converge. Padded rows and
    columns, and the whole plan of an example without a real row or a real column, are zero.
    Runs in fp32 whatever `cost`'s dtype, and never records a gradient: the plan is a
    constant of the loss (as UNITER).
    """
    if beta <= 0 or iters < 1 or k < 1:
        raise ValueError(f"ipot needs beta > 0, iters >= 1, k >= 1 (got {beta}, {iters}, {k})")
    x_mask, y_mask = x_mask.bool(), y_mask.bool()
    # An example with no real column (or row) has nothing to transport: all its rows (columns)
    # count as padding, so its plan is zero instead of 0/0.
    x_mask = x_mask & y_mask.any(1, keepdim=True)
    y_mask = y_mask & x_mask.any(1, keepdim=True)
    c = cost.detach().float()
    n = x_mask.sum(1, keepdim=True).clamp_min(1).to(c)  # [B, 1]
    m = y_mask.sum(1, keepdim=True).clamp_min(1).to(c)  # [B, 1]
    x_pad = (~x_mask).to(c)  # [B, N]
    y_pad = (~y_mask).to(c)  # [B, M]
    # A = exp(-C / beta), zero where a row or column is padded (exp(-inf)): the plan then stays
    # zero there through every product, without masking inside the loop.
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    a = torch.exp(c.masked_fill(~valid, math.inf).mul_(-1 / beta))  # [B, N, M]
    plan = valid.to(c)  # T(1): ones on the real block
    q = torch.empty_like(a)
    sigma = y_mask.to(c) / m  # [B, M]
    for _ in range(iters):
        torch.mul(a, plan, out=q)
        for _ in range(k):
            # Both products are written as a row vector times a matrix: torch's CPU bmm runs
            # [B, 1, M] @ [B, M, N] about 3x faster than [B, N, M] @ [B, M, 1], although both
            # read the same matrix. Adding 1 at the padded positions keeps their scaling
            # finite (1) where Q is all zero; it never reaches the plan.
            delta = torch.bmm(sigma[:, None, :], q.transpose(1, 2)).squeeze(1)  # Q sigma [B, N]
            delta = delta.mul_(n).add_(x_pad).reciprocal_()  # 1 / (n Q sigma)
            sigma = torch.bmm(delta[:, None, :], q).squeeze(1)  # Q^T delta [B, M]
            sigma = sigma.mul_(m).add_(y_pad).reciprocal_()  # 1 / (m Q^T delta)
        torch.mul(q, delta[:, :, None], out=plan).mul_(sigma[:, None, :])  # diag(d) Q diag(s)
    return plan


def ot_distance(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor,
                beta: float = 0.5, iters: int = 50) -> torch.Tensor:
    """The OT distance of each example under the cosine cost: x [B, N, D], y [B, M, D] -> [B].

    sum(plan * cost) in fp32, the gradient flowing through the cost only: IPOT's plan is a
    constant (UNITER's `optimal_transport_dist`). fp32 holds under autocast too.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        cost = cosine_cost(x.float(), y.float())  # [B, N, M]
        plan = ipot(cost, x_mask, y_mask, beta=beta, iters=iters)
        return (plan * cost).sum(dim=(1, 2))


def wra_loss(txt_h: torch.Tensor, img_h: torch.Tensor, txt_mask: torch.Tensor,
             img_mask: torch.Tensor, matched: torch.Tensor, beta: float = 0.5,
             iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """UNITER's WRA loss on an ITM batch -> (loss [], OT distances [B], both fp32).

    txt_h [B, T, D] and img_h [B, R, D] are the encoder's output states at the text and
    region positions, matched [B] bool whether the image belongs to the text.

    This follows UNITER's code (pretrain.py), not its paper, which writes the loss as a
    pair's OT distance (L_WRA = D_ot(mu, nu)) without telling matched from unmatched pairs.
    The code pulls matched pairs together and pushes unmatched ones apart: their distances
    count with + and - respectively, and the sum is divided by the number of pairs, matched
    and unmatched together (not a mean per group). A batch without matched or without unmatched
    pairs just has no term of that sign; an empty batch gives 0. The weight 0.1 that
    UNITER puts on this loss (`itm_ot_lambda`: ITM loss + 0.1 * WRA loss) is the caller's.
    """
    dist = ot_distance(txt_h, img_h, txt_mask, img_mask, beta=beta, iters=iters)
    signed = torch.where(matched.bool(), dist, -dist)
    return signed.sum() / max(dist.numel(), 1), dist
