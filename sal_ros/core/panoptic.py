"""Panoptic fusion of per-point query results into a Segmentation, and the instances' summaries (numpy only:
evaluation, tracking and benches use them without importing torch).

Per point: it joins its best query when that query's fused score reaches ``score_threshold``. Thing queries are
instances; all points of one stuff class merge into one segment with instance 0. Segments with fewer than
``min_points`` points are dropped (label 0). The score of a point is its query's fused score; an instance's score
is the mean over its points.
"""
from __future__ import annotations

import numpy as np

from sal_ros.core.types import InstanceSummary, OrientedBox, Segmentation


def panoptic_from_queries(query: np.ndarray, score: np.ndarray, query_class: np.ndarray, thing: np.ndarray,
                          points: np.ndarray, class_names: tuple[str, ...] = (), score_threshold: float = 0.0,
                          min_points: int = 1, vocabulary_version: int = 0,
                          query_rank: tuple[np.ndarray, np.ndarray] | None = None) -> Segmentation:
    """Per-point fusion result -> Segmentation.

    ``query (N,)`` best query per point, ``score (N,)`` its fused score, ``query_class (Q,)`` class index per
    query, ``thing (K,)`` thing flag per class, ``points (N, 3)`` for the instance boxes, ``query_rank``
    (:func:`rank_classes` of the queries) the top classes each instance reports.
    """
    n, q_count = len(query), len(query_class)
    query = np.asarray(query, np.int64)
    score = np.asarray(score, np.float32)
    cls = np.asarray(query_class, np.int64)[query]
    is_thing = np.asarray(thing, bool)[cls]
    # segment key: a thing query is its own segment; all queries of one stuff class share one
    segment = np.where(is_thing, query, q_count + cls)
    keep = score >= score_threshold
    counts = np.bincount(segment[keep], minlength=q_count + len(thing))
    keep &= counts[segment] >= max(int(min_points), 1)

    label = np.zeros(n, np.uint16)
    label[keep] = (cls[keep] + 1).astype(np.uint16)
    instance = np.zeros(n, np.uint32)
    thing_points = keep & is_thing
    ids, inst_of_point = _dense_ids(query[thing_points], q_count)  # queries in ascending order
    instance[thing_points] = (inst_of_point + 1).astype(np.uint32)
    seg = Segmentation(label=label, instance=instance, score=np.where(keep, score, 0).astype(np.float32),
                       class_names=tuple(class_names), vocabulary_version=vocabulary_version)
    seg.instances = instance_summaries(points, instance, label, seg.score, class_names)
    if query_rank is not None:
        top, prob = query_rank
        for inst, q in zip(seg.instances, ids):  # instance j + 1 is thing query ids[j], both ascending
            inst.class_scores = tuple((int(c) + 1, float(p)) for c, p in zip(top[q], prob[q]))
    return seg


def instance_summaries(points: np.ndarray, instance: np.ndarray, label: np.ndarray, score: np.ndarray,
                       class_names: tuple[str, ...] = ()) -> list[InstanceSummary]:
    """One summary per instance id > 0: class, mean score, point count and a yaw-oriented box.

    Yaw is the principal axis of the points' xy covariance (length along it, width across), z spans the
    points' range; all instances at once with bincount moments and per-instance min/max.
    """
    inside = instance > 0
    if not inside.any():
        return []
    ids, inv = _dense_ids(instance[inside])
    k = len(ids)
    p = np.asarray(points, np.float64)[inside]
    count = np.bincount(inv, minlength=k).astype(np.float64)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(inv, weights=v, minlength=k) / count

    mx, my = mean(p[:, 0]), mean(p[:, 1])
    dx, dy = p[:, 0] - mx[inv], p[:, 1] - my[inv]
    cxx, cyy, cxy = mean(dx * dx), mean(dy * dy), mean(dx * dy)
    yaw = 0.5 * np.arctan2(2 * cxy, cxx - cyy)  # direction of the larger eigenvector
    c, s = np.cos(yaw)[inv], np.sin(yaw)[inv]
    local = (c * dx + s * dy, -s * dx + c * dy, np.ascontiguousarray(p[:, 2]))  # along, across, up
    lo, hi = np.full((3, k), np.inf), np.full((3, k), -np.inf)
    for axis, column in enumerate(local):  # ufunc.at is 5x faster on 1-D contiguous operands than on (k, 3) rows
        np.minimum.at(lo[axis], inv, column)
        np.maximum.at(hi[axis], inv, column)
    lo, hi = lo.T, hi.T
    mid = (lo + hi) / 2
    cy, sy = np.cos(yaw), np.sin(yaw)
    centers = np.stack([mx + cy * mid[:, 0] - sy * mid[:, 1], my + sy * mid[:, 0] + cy * mid[:, 1], mid[:, 2]], 1)
    sizes = hi - lo
    first_row = np.full(k, len(inv))
    np.minimum.at(first_row, inv, np.arange(len(inv)))
    first = np.flatnonzero(inside)[first_row]  # one point per instance (its first), for its label
    labels = np.asarray(label)[first].astype(np.int64)
    scores = mean(np.asarray(score, np.float64)[inside])
    out = []
    for j in range(k):
        lab = int(labels[j])
        name = class_names[lab - 1] if 0 < lab <= len(class_names) else ""
        out.append(InstanceSummary(int(ids[j]), lab, name, float(scores[j]), int(count[j]),
                                   OrientedBox(centers[j].astype(np.float32), sizes[j].astype(np.float32),
                                               float(yaw[j]))))
    return out


def _dense_ids(values: np.ndarray, bound: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for non-negative integer ids, through a lookup table (no sort)
    when the ids are below ``bound`` (default: a few times the number of values)."""
    values = np.asarray(values).reshape(-1)
    limit = bound if bound is not None else 4 * len(values) + 1024
    if values.size == 0 or int(values.max()) >= limit:
        ids, inv = np.unique(values, return_inverse=True)
        return ids, inv.reshape(-1)
    present = np.bincount(values, minlength=int(values.max()) + 1) > 0
    ids = np.flatnonzero(present).astype(values.dtype)
    rank = np.cumsum(present) - 1
    return ids, rank[values]


__all__ = ["panoptic_from_queries", "instance_summaries"]
