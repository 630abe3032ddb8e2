"""Hungarian matching of decoder queries to pseudo-instances (DETR / Mask2Former style).

Cost per (query, instance): ``w_obj * (-p_object) + w_bce * BCE(mask) + w_dice * Dice(mask)``, all as dense
matrix products over points, then ``scipy.optimize.linear_sum_assignment``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from sal_ros.model.decoder import OBJECT


def sigmoid_bce_cost(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, N) logits, (K, N) {0, 1} targets -> (Q, K) mean per-point BCE of every query against every target."""
    n = max(mask_logits.shape[1], 1)
    pos = F.softplus(-mask_logits)  # -log sigmoid(x): cost where the target is 1
    neg = F.softplus(mask_logits)  # -log(1 - sigmoid(x)): cost where the target is 0
    return (pos @ targets.T + neg @ (1 - targets).T) / n


def dice_cost(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, K) soft Dice loss 1 - (2|P∩T| + 1) / (|P| + |T| + 1)."""
    prob = mask_logits.sigmoid()
    inter = prob @ targets.T
    return 1 - (2 * inter + 1) / (prob.sum(-1, keepdim=True) + targets.sum(-1)[None, :] + 1)


@torch.no_grad()
def match(mask_logits: torch.Tensor, obj_logits: torch.Tensor, target_masks: torch.Tensor,
          w_obj: float = 2.0, w_bce: float = 5.0, w_dice: float = 2.0,
          point_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment; returns (query indices, target indices), both (min(Q, K),) int64.

    ``mask_logits`` (Q, N), ``obj_logits`` (Q, 2), ``target_masks`` (K, N) bool/float. ``point_index`` picks a
    subset of points for the mask costs (Mask2Former samples points to keep the products small).
    """
    q, k = mask_logits.shape[0], target_masks.shape[0]
    if k == 0 or q == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    logits = mask_logits.float()
    tgt = target_masks.to(logits.dtype)
    if point_index is not None:
        logits, tgt = logits[:, point_index], tgt[:, point_index]
    p_obj = obj_logits.float().softmax(-1)[:, OBJECT]
    cost = (w_bce * sigmoid_bce_cost(logits, tgt) + w_dice * dice_cost(logits, tgt)
            - w_obj * p_obj[:, None])
    cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

