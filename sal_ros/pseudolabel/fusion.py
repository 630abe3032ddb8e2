"""Multi-camera fusion of lifted masks into one set of per-point pseudo-instances.

An object seen by two cameras (a car across the FRONT / FRONT_LEFT seam on nuScenes) is lifted twice. SAL-4D
merges instances across cameras by IoU and averages their tokens weighted by mask area. Each camera sees only
its part of the object, so the IoU of the whole point sets is small for exactly the objects that matter; we
measure IoU *inside the co-visible region* (points visible in both cameras): two lifted instances are the same
object when they agree where both cameras can judge. Merges are transitive (connected components).

A point claimed by instances that did not merge (the cameras disagree) goes to the one with the higher mask
score. Fused tokens are area-weighted means, re-normalized; scores are area-weighted means; ``cameras`` is a
bitmask over the camera order given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CameraLift:
    """One camera's masks lifted onto the frame's points."""

    name: str
    mask_id: np.ndarray  # (N,) int32, mask index per point, -1 = none
    visible: np.ndarray  # (N,) bool, passed projection (and occlusion test when enabled)
    in_image: np.ndarray  # (N,) bool, projects into the image (frustum), regardless of occlusion
    tokens: np.ndarray  # (M, D) float32
    scores: np.ndarray  # (M,) float32
    areas: np.ndarray  # (M,) mask areas in pixels


@dataclass
class FusedInstances:
    instance: np.ndarray  # (N,) uint32, 0 = none, 1..K
    tokens: np.ndarray  # (K, D) float32, unit norm (zero rows if D == 0)
    scores: np.ndarray  # (K,) float32
    cameras: np.ndarray  # (K,) uint32 bitmask over the lifts' order
    areas: np.ndarray  # (K,) summed mask areas (pixels)
    in_frustum: np.ndarray  # (N,) bool


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def merge_edges(ids: list[np.ndarray], visible: list[np.ndarray], iou_threshold: float,
                min_shared: int) -> np.ndarray:
    """(E, 2) pairs of global instance ids (different cameras) that agree in their co-visible region."""
    edges = []
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            both = visible[a] & visible[b]
            if both.sum() < min_shared:
                continue
            ga, gb = ids[a][both], ids[b][both]
            has = (ga >= 0) & (gb >= 0)
            if not has.any():
                continue
            pairs, inter = np.unique(np.stack([ga[has], gb[has]], 1), axis=0, return_counts=True)
            size_a = np.bincount(ga[ga >= 0])[pairs[:, 0]]  # sizes inside the co-visible region
            size_b = np.bincount(gb[gb >= 0])[pairs[:, 1]]
            iou = inter / (size_a + size_b - inter)
            ok = (iou >= iou_threshold) & (inter >= min_shared)
            edges.append(pairs[ok])
    return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)


def fuse_cameras(lifts: list[CameraLift], num_points: int, iou_threshold: float = 0.3,
                 min_shared: int = 3) -> FusedInstances:
    dim = max((lf.tokens.shape[1] for lf in lifts), default=0)
    offsets = np.cumsum([0] + [len(lf.scores) for lf in lifts])
    total = int(offsets[-1])
    ids = [np.where(lf.mask_id >= 0, lf.mask_id + offsets[c], -1).astype(np.int64) for c, lf in enumerate(lifts)]
    edges = merge_edges(ids, [lf.visible for lf in lifts], iou_threshold, min_shared)
    group = _components(total, edges)  # global mask id -> fused group
    scores = np.concatenate([lf.scores for lf in lifts]).astype(np.float64) if total else np.zeros(0)
    areas = np.concatenate([lf.areas for lf in lifts]).astype(np.float64) if total else np.zeros(0)
    cam_of = np.repeat(np.arange(len(lifts)), np.diff(offsets))

    # Per point: the candidate (over cameras) whose mask scores highest.
    point_group = np.full(num_points, -1, np.int64)
    point_score = np.full(num_points, -np.inf)
    for gid in ids:
        has = gid >= 0
        s = np.where(has, scores[np.maximum(gid, 0)] if total else 0.0, -np.inf)
        take = s > point_score
        point_group[take] = group[gid[take]]
        point_score[take] = s[take]

    n_groups = int(group.max()) + 1 if total else 0
    w = np.bincount(group, weights=areas, minlength=n_groups) if total else np.zeros(0)
    tokens = np.zeros((n_groups, dim))
    if dim and total:
        stacked = np.concatenate([lf.tokens for lf in lifts]).astype(np.float64)
        np.add.at(tokens, group, stacked * areas[:, None])
    g_scores = np.bincount(group, weights=scores * areas, minlength=n_groups) / np.maximum(w, 1e-9) if total else w
    g_cams = np.zeros(n_groups, np.uint32)
    np.bitwise_or.at(g_cams, group, (np.uint32(1) << cam_of.astype(np.uint32)))

    # Compact: groups that kept at least one point, numbered 1..K in order of first appearance by group id.
    present = np.unique(point_group[point_group >= 0])
    lut = np.zeros(n_groups + 1, np.uint32)
    lut[present + 1] = np.arange(1, present.size + 1, dtype=np.uint32)
    instance = lut[point_group + 1]
    tokens = tokens[present]
    norm = np.linalg.norm(tokens, axis=1, keepdims=True)
    tokens = np.where(norm > 0, tokens / np.maximum(norm, 1e-12), 0.0)
    in_frustum = np.zeros(num_points, bool)
    for lf in lifts:
        in_frustum |= lf.in_image
    return FusedInstances(instance, tokens.astype(np.float32), g_scores[present].astype(np.float32),
                          g_cams[present], w[present], in_frustum)
