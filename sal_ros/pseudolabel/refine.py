"""SAL's DBSCAN refinement of lifted masks.

Lifted masks bleed at their edges (calibration error, parallax, the mask's own boundary error) and miss points
the camera does not see. SAL clusters the points at several densities and *replaces* each lifted mask by a
cluster that overlaps it enough (pseudo-label class-agnostic PQ: lifted 46.0, DBSCAN filter 46.7, replace 48.7).

- ``dbscan``: exact DBSCAN on a KD-tree (radius pairs, core points, core-core connected components, border
  points joined to a neighbouring core); milliseconds on ~20k points;
- ``ground_mask``: a RANSAC ground plane, so objects standing on the ground do not fuse through it;
- ``dbscan_refine``: cluster the candidate points once per ``eps``, match clusters to instances by IoU, and
  ``replace`` (or ``filter``: keep only the instance's points inside its cluster).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RefineConfig:
    eps: tuple[float, ...] = (0.3, 0.5, 0.8)  # metres; several densities
    min_samples: int = 3
    iou_threshold: float = 0.5
    mode: str = "replace"  # replace | filter
    remove_ground: bool = True
    ground_threshold: float = 0.25  # metres above the fitted plane that still count as ground
    max_points: int = 200_000  # guard: clustering above this many candidate points is skipped

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "filter"):
            raise ValueError(f"refine mode must be 'replace' or 'filter', got {self.mode!r}")
        self.eps = tuple(float(e) for e in self.eps)
        if not self.eps or min(self.eps) <= 0:
            raise ValueError(f"eps must be positive distances, got {self.eps}")


def dbscan(points: np.ndarray, eps: float, min_samples: int = 3) -> np.ndarray:
    """Cluster labels (N,) int64, -1 = noise; same clusters as sklearn's DBSCAN (border ties may differ)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(points)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points).query_pairs(eps, output_type="ndarray")
    degree = np.bincount(pairs.ravel(), minlength=n) + 1  # a point is its own neighbour, as in sklearn
    core = degree >= min_samples
    cc = pairs[core[pairs[:, 0]] & core[pairs[:, 1]]]
    graph = coo_matrix((np.ones(len(cc), np.int8), (cc[:, 0], cc[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    labels = np.full(n, -1, np.int64)
    labels[core] = comp[core]
    # Border points: not core, within eps of a core point; they join that core's cluster.
    for a, b in ((0, 1), (1, 0)):
        e = pairs[core[pairs[:, a]] & ~core[pairs[:, b]]]
        labels[e[:, b]] = comp[e[:, a]]
    _, labels[labels >= 0] = np.unique(labels[labels >= 0], return_inverse=True)
    return labels


def ground_mask(points: np.ndarray, threshold: float = 0.25, iterations: int = 200, max_tilt_deg: float = 15.0,
                seed: int = 0) -> np.ndarray:
    """(N,) bool: points within ``threshold`` of (or below) a RANSAC plane fitted to the lowest points."""
    n = len(points)
    if n < 3:
        return np.zeros(n, bool)
    pts = points.astype(np.float64)
    low = pts[pts[:, 2] <= np.percentile(pts[:, 2], 40)]
    rng = np.random.default_rng(seed)
    tri = low[rng.integers(0, len(low), size=(iterations, 3))]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normal, axis=1)
    ok = length > 1e-9
    normal = normal[ok] / length[ok, None]
    normal *= np.sign(normal[:, 2:3] + 1e-12)  # up
    keep = normal[:, 2] >= np.cos(np.radians(max_tilt_deg))
    if not keep.any():
        return np.zeros(n, bool)
    normal, anchor = normal[keep], tri[ok][keep, 0]
    offset = -(normal * anchor).sum(1)
    sample = low[rng.integers(0, len(low), size=min(len(low), 4000))]
    inliers = (np.abs(sample @ normal.T + offset) < threshold).sum(0)
    best = int(np.argmax(inliers))
    height = pts @ normal[best] + offset[best]
    return height < threshold


def _contingency(instance: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(instance id, cluster id, shared points) over points that have both."""
    both = (instance > 0) & (clusters >= 0)
    key = instance[both].astype(np.int64) << 32 | clusters[both]
    pairs, inter = np.unique(key, return_counts=True)
    return pairs >> 32, pairs & 0xFFFFFFFF, inter


def dbscan_refine(points: np.ndarray, instance: np.ndarray, candidates: np.ndarray,
                  config: RefineConfig = RefineConfig()) -> np.ndarray:
    """New (N,) instance ids: each instance with a cluster of IoU >= threshold is replaced by (or filtered to)
    that cluster. Clusters are built from ``candidates`` points (e.g. in a camera frustum) minus the ground;
    points outside them (the ground under a car, its wheels' contact) keep their lifted label.
    Instance ids keep their meaning; some may lose all points (compact afterwards)."""
    instance = np.asarray(instance, np.int64)
    cand = np.asarray(candidates, bool).copy()
    if config.remove_ground and cand.sum() >= 3:
        cand[np.flatnonzero(cand)[ground_mask(points[cand], config.ground_threshold)]] = False
    idx = np.flatnonzero(cand)
    k = int(instance.max(initial=0))
    if k == 0 or idx.size == 0 or idx.size > config.max_points:
        return instance.copy()
    inst_size = np.bincount(instance, minlength=k + 1)
    best_iou = np.zeros(k + 1)
    best_level = np.full(k + 1, -1)
    best_cluster = np.full(k + 1, -1)
    levels = []
    for level, eps in enumerate(config.eps):
        labels = np.full(len(points), -1, np.int64)
        labels[idx] = dbscan(points[idx], eps, config.min_samples)
        levels.append(labels)
        cluster_size = np.bincount(labels[labels >= 0])
        ii, cc, inter = _contingency(instance, labels)
        iou = inter / (inst_size[ii] + cluster_size[cc] - inter)
        order = np.argsort(iou, kind="stable")  # ascending: the best pair per instance is written last
        ii, cc, iou = ii[order], cc[order], iou[order]
        better = iou > best_iou[ii]
        ii, cc, iou = ii[better], cc[better], iou[better]
        best_iou[ii], best_level[ii], best_cluster[ii] = iou, level, cc
    members = _members(levels, best_level, best_cluster)
    out = instance.copy()
    chosen = [i for i in np.argsort(-best_iou) if best_iou[i] >= config.iou_threshold and i > 0]
    if config.mode == "filter":
        for i in chosen:
            keep = np.zeros(len(points), bool)
            keep[members[int(i)]] = True
            out[(instance == i) & ~keep & cand] = 0
        return out
    claimed = np.zeros(len(points), bool)
    for i in chosen:  # best match first: it keeps contested points
        out[(out == i) & ~claimed & cand] = 0  # points never clustered (ground, outside) keep their label
        pts = members[int(i)]
        pts = pts[~claimed[pts]]
        out[pts] = i
        claimed[pts] = True
    return out


def _members(levels: list[np.ndarray], best_level: np.ndarray, best_cluster: np.ndarray) -> dict[int, np.ndarray]:
    """Point indices of each instance's chosen cluster, one sort per density level."""
    out: dict[int, np.ndarray] = {}
    for level, labels in enumerate(levels):
        wanted = np.flatnonzero(best_level == level)
        if wanted.size == 0:
            continue
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        start = np.searchsorted(sorted_labels, best_cluster[wanted], "left")
        stop = np.searchsorted(sorted_labels, best_cluster[wanted], "right")
        for i, a, b in zip(wanted, start, stop):
            out[int(i)] = order[a:b]
    return out


def compact(instance: np.ndarray, min_points: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Renumber instance ids 1..K' in id order, dropping ids with fewer than ``min_points`` points.
    Returns (new (N,) uint32, kept old ids (K',))."""
    instance = np.asarray(instance, np.int64)
    counts = np.bincount(instance, minlength=1)
    kept = np.flatnonzero(counts >= max(min_points, 1))
    kept = kept[kept > 0]
    lut = np.zeros(counts.size, np.uint32)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint32)
    return lut[instance], kept
