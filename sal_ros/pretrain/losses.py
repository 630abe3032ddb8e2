"""Distillation objectives: ScaLR's point-pixel feature distance and Seal's superpixel-superpoint contrast.

All point features arrive L2-normalised from the projection head (sal_ros.pretrain.model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def scalr_loss(feats: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean Euclidean distance between normalised point features (P, D) and their pixels' teacher features
    (ScaLR), optionally a weighted mean (``rarity_weights``)."""
    if len(feats) == 0:
        return feats.sum() * 0.0
    dist = (feats - F.normalize(targets.float(), dim=1)).norm(dim=1)
    return dist.mean() if weights is None else (weights * dist).sum() / weights.sum()


def rarity_weights(targets: Tensor, power: float, floor: float = 1e-3) -> Tensor:
    """(P,) pair weights, mean 1, that keep rare teacher content from drowning in a per-pair mean.

    A scan's pairs are dominated by what covers most of the image (road, buildings): with the plain mean a thin
    or small object's few pairs move the student so little that it is still unlearnt when the schedule ends.
    Each pair is weighted by ``density ** -power``, its teacher feature's density among the scan's pairs =
    its mean cosine to them (``t_i . mean_j t_j`` of unit features, linear cost; clamped at ``floor``). Power 1
    gives every kind of content the same total weight (for one-hot features: every class), 0 the plain mean.
    Teacher-agnostic: it needs no classes, only the frozen features.
    """
    unit = F.normalize(targets.float(), dim=1)
    density = (unit @ unit.mean(0)).clamp_min(floor)
    w = density.pow(-float(power))
    return w / w.mean()


def segment_mean(feats: Tensor, segment: Tensor, num: int) -> Tensor:
    """(num, D) mean of ``feats`` rows per segment id 0..num-1 (rows with no point stay zero)."""
    sums = feats.new_zeros(num, feats.shape[1]).index_add_(0, segment, feats)
    counts = torch.bincount(segment, minlength=num).clamp_(min=1).to(feats.dtype)
    return sums / counts[:, None]


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Row i of ``a`` should match row i of ``b`` against every other row (SLidR / Seal, both directions
    averaged: the 2D side is frozen here, so only the point side learns)."""
    if len(a) < 2:
        return a.sum() * 0.0
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def point_to_segment(feats: Tensor, segment: Tensor, means: Tensor) -> Tensor:
    """Seal's point-to-segment regularisation: 1 - cos(point feature, its superpoint's mean feature)."""
    if len(feats) == 0:
        return feats.sum() * 0.0
    return (1.0 - (feats * F.normalize(means[segment], dim=1)).sum(1)).mean()


def subsample(n: int, limit: int, generator: torch.Generator) -> Tensor:
    """At most ``limit`` of ``range(n)`` (random, from the step's generator); all of them under the limit."""
    if limit <= 0 or n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit].sort().values


__all__ = ["scalr_loss", "rarity_weights", "segment_mean", "info_nce", "point_to_segment", "subsample"]
