"""SAL distillation loss: objectness CE + mask BCE + Dice + token cosine distance, over every decoder layer.

Each decoder layer's predictions are matched to the pseudo-instances on their own (deep supervision, as
Mask2Former / MaskPLS). Default weights are Mask4Former's (objectness 2, BCE 5, Dice 2, no-object 0.1); the
token weight is not published and defaults to 2 (same scale as Dice: both are in [0, 2] / [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sal_ros.core.settings import known_settings
from sal_ros.model.decoder import OBJECT
from sal_ros.train.matching import match


@dataclass
class LossWeights:
    obj: float = 2.0
    bce: float = 5.0
    dice: float = 2.0
    token: float = 2.0
    no_object: float = 0.1  # class weight of "no object" in the objectness cross-entropy
    match_points: int = 0  # points sampled for the matching costs (0 = all)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LossWeights":
        return cls(**known_settings(cls, d, "loss"))


@dataclass
class Target:
    """Pseudo-labels of one sample: ``masks`` (K, N) bool over the model's input points, ``tokens`` (K, D)."""

    masks: torch.Tensor
    tokens: torch.Tensor


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per matched pair (M,) soft Dice loss."""
    prob = logits.sigmoid()
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def layer_losses(mask_logits: torch.Tensor, obj_logits: torch.Tensor, tokens: torch.Tensor, target: Target,
                 w: LossWeights, num_masks: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Unweighted loss terms of one layer and one sample; mask/token terms are sums divided by ``num_masks``."""
    point_index = None
    n = mask_logits.shape[1]
    if w.match_points and n > w.match_points:
        point_index = torch.randperm(n, generator=generator)[: w.match_points].to(mask_logits.device)
    qi, ti = match(mask_logits, obj_logits, target.masks, w.obj, w.bce, w.dice, point_index)
    qi, ti = qi.to(mask_logits.device), ti.to(mask_logits.device)
    cls_target = torch.full((obj_logits.shape[0],), 1 - OBJECT, dtype=torch.int64, device=obj_logits.device)
    cls_target[qi] = OBJECT
    class_weight = torch.ones(2, device=obj_logits.device, dtype=torch.float32)
    class_weight[1 - OBJECT] = w.no_object
    losses = {"obj": F.cross_entropy(obj_logits.float(), cls_target, weight=class_weight)}
    if qi.numel() == 0:
        zero = mask_logits.sum() * 0.0  # keeps the graph (DDP needs every parameter to get a gradient)
        return {**losses, "bce": zero, "dice": zero, "token": tokens.sum() * 0.0}
    logits = mask_logits[qi].float()
    tgt = target.masks[ti].to(logits.dtype)
    losses["bce"] = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(-1).sum() / num_masks
    losses["dice"] = dice_loss(logits, tgt).sum() / num_masks
    pred_tok = F.normalize(tokens[qi].float(), dim=-1)
    tgt_tok = F.normalize(target.tokens[ti].float(), dim=-1)
    losses["token"] = (1 - (pred_tok * tgt_tok).sum(-1)).sum() / num_masks
    return losses


def sal_loss(layers: list[dict], targets: list[Target], w: LossWeights, num_masks: float | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total weighted loss over decoder layers and samples, and its terms (final layer, floats) for logging.

    ``layers``: one dict per decoder layer with per-sample lists ``masks`` [(Q, N_b)], ``objectness`` [(Q, 2)],
    ``tokens`` [(Q, D)]. ``num_masks``: number of target instances to normalize by (summed over DDP ranks).
    """
    if num_masks is None:
        num_masks = float(sum(t.masks.shape[0] for t in targets))
    num_masks = max(float(num_masks), 1.0)
    total = 0.0
    terms: dict[str, float] = {}
    for li, layer in enumerate(layers):
        sums: dict[str, torch.Tensor] = {}
        for b, target in enumerate(targets):
            parts = layer_losses(layer["masks"][b], layer["objectness"][b], layer["tokens"][b], target, w,
                                 num_masks, generator)
            parts["obj"] = parts["obj"] / len(targets)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
        layer_total = w.obj * sums["obj"] + w.bce * sums["bce"] + w.dice * sums["dice"] + w.token * sums["token"]
        total = total + layer_total
        if li == len(layers) - 1:
            terms = {k: float(v.detach()) for k, v in sums.items()}
    return total, terms
