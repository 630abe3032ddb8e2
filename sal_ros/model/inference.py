"""Query fusion and zero-shot classification of the decoder's predictions (torch); the panoptic fusion of their
per-point result is numpy, in sal_ros.core.panoptic.

Per point (through its voxel): score of query q = sigmoid(mask logit) x P(object). Each query's class is the
argmax of its token's cosine similarity to the vocabulary's text embeddings (max over a class's rows for ``max``
vocabularies).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sal_ros.model.decoder import OBJECT


def class_similarity(tokens: Tensor, embeddings: Tensor, row_class: Tensor, num_classes: int) -> Tensor:
    """``(Q, K)`` cosine similarity of each query token to each class: ``tokens (Q, D)``, ``embeddings (R, D)``
    unit rows of class ``row_class (R,)``; a class scores the max over its rows."""
    sim = torch.nn.functional.normalize(tokens.float(), dim=-1) @ embeddings.float().T  # (Q, R)
    per_class = sim.new_full((sim.shape[0], num_classes), float("-inf"))
    per_class.scatter_reduce_(1, row_class[None].expand(sim.shape[0], -1), sim, "amax")
    return per_class


def classify(tokens: Tensor, embeddings: Tensor, row_class: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class index and cosine similarity per query (the best of :func:`class_similarity`)."""
    best, cls = class_similarity(tokens, embeddings, row_class, num_classes).max(1)
    return cls, best


def rank_classes(per_class: Tensor, k: int = 3, logit_scale: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` classes per query (indices ``(Q, k)``) and their probabilities: softmax over the vocabulary of
    the cosine similarities times CLIP's logit scale, as CLIP's zero-shot classifier reads them."""
    probs = (per_class.float() * logit_scale).softmax(-1)
    p, idx = probs.topk(min(k, per_class.shape[1]), dim=1)
    return idx.cpu().numpy(), p.cpu().numpy()


FUSE_BLOCK_VOXELS = 4096  # 4096 voxels x 300 queries x 4 bytes = 4.9 MB of float32 scores per block


def fuse_queries(mask_logits: Tensor, obj_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Best query and its fused score per voxel: ``mask_logits (Q, V)``, ``obj_logits (Q, 2)``.

    Voxel block by voxel block, so the float32 scores never exist at full size (one (V, Q) float32 copy cost more
    than the sigmoid); the decoder's (Q, V) view of (V, Q) logits is reduced along its contiguous rows."""
    p_obj = obj_logits.float().softmax(-1)[:, OBJECT]
    logits = mask_logits.T  # (V, Q)
    n = logits.shape[0]
    score = torch.empty(n, device=logits.device)
    query = torch.empty(n, dtype=torch.int64, device=logits.device)
    for start in range(0, n, FUSE_BLOCK_VOXELS):
        rows = slice(start, start + FUSE_BLOCK_VOXELS)
        block = logits[rows].to(torch.float32, copy=True).sigmoid_().mul_(p_obj)  # copy: never the caller's
        torch.max(block, 1, out=(score[rows], query[rows]))
    return query, score


__all__ = ["class_similarity", "classify", "rank_classes", "fuse_queries"]
