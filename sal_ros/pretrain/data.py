"""Pretraining samples: a frame's points with its teacher cache, a temporal partner frame t+n for Seal, and
augmentation drawn from the step's generator (so a resumed run sees the same samples)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sal_ros.pretrain.cache import cache_path, load_entry, load_meta


@dataclass
class FrameItem:
    key: str
    points: np.ndarray  # (N, 3) float32, augmented
    intensity: np.ndarray  # (N,)
    cameras: list[dict]  # cache entries per camera: index, cell, fmap, [segment, segfeats]
    pose: np.ndarray | None = None


@dataclass
class Sample:
    frame: FrameItem
    partner: FrameItem | None = None
    matches: np.ndarray | None = None  # (N_t,) row in partner's points of each point of frame (-1 = none)
    extra: dict = field(default_factory=dict)


class PretrainData:
    """Frames (``keys`` of FrameSources) and their cache files; ``partners`` maps a key to its frame t+n."""

    def __init__(self, items: list[tuple[object, str]], cache_dir: str | Path, temporal_gap: int = 0,
                 match_radius: float = 0.3, augment: bool = True, cache_size: int = 64) -> None:
        self.items = items  # (FrameSource, key)
        self.cache_dir = Path(cache_dir)
        self.augment = augment
        self.match_radius = match_radius
        self.partners = _partners(items, temporal_gap) if temporal_gap > 0 else {}
        self._load = lru_cache(maxsize=cache_size)(self._load_raw)
        self._matches: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _load_raw(self, index: int):
        source, key = self.items[index]
        frame = source.load(key)
        entry = load_entry(cache_path(self.cache_dir, key))
        intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
        pose = entry["meta"].get("pose")
        return frame.points, intensity, entry["cameras"], None if pose is None else np.asarray(pose)

    def frame(self, index: int, rot: float, flip: bool) -> FrameItem:
        points, intensity, cams, pose = self._load(index)
        return FrameItem(self.items[index][1], _augment(points, rot, flip), intensity, cams, pose)

    def sample(self, index: int, generator: torch.Generator) -> Sample:
        rot = float(torch.rand((), generator=generator)) * 2 * math.pi if self.augment else 0.0
        flip = bool(torch.rand((), generator=generator) < 0.5) if self.augment else False
        item = self.frame(index, rot, flip)
        partner_index = self.partners.get(index)
        if partner_index is None or item.pose is None or self._load(partner_index)[3] is None:
            return Sample(item)  # no frame t+n, or no poses to align it
        partner = self.frame(partner_index, rot, flip)
        return Sample(item, partner, self.matches(index, partner_index))

    def temporal_pairs(self) -> dict:
        """How many scans Seal's temporal term can use: with a frame t+n and both poses, without a frame t+n
        (the end of a recording), without a pose (theirs or their partner's)."""
        def has_pose(i: int) -> bool:
            return load_meta(cache_path(self.cache_dir, self.items[i][1])).get("pose") is not None

        paired = sum(has_pose(i) and has_pose(j) for i, j in self.partners.items())
        return {"scans": len(self), "paired": paired, "no_partner": len(self) - len(self.partners),
                "no_pose": len(self.partners) - paired}

    def matches(self, i: int, j: int) -> np.ndarray:
        """Nearest point of frame j to each point of frame i after moving i into j's frame with the poses."""
        key = (self.items[i][1], self.items[j][1])
        if key not in self._matches:
            from scipy.spatial import cKDTree

            pi, _, _, pose_i = self._load(i)
            pj, _, _, pose_j = self._load(j)
            T = np.linalg.inv(pose_j) @ pose_i
            moved = pi.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
            dist, nearest = cKDTree(pj).query(moved, k=1, distance_upper_bound=self.match_radius, workers=1)
            self._matches[key] = np.where(np.isfinite(dist), nearest, -1).astype(np.int64)
        return self._matches[key]


def _augment(points: np.ndarray, rot: float, flip: bool) -> np.ndarray:
    """Rotation about z and an optional mirror across the x-z plane (the teacher pairs are by point index)."""
    if rot == 0.0 and not flip:
        return points
    c, s = math.cos(rot), math.sin(rot)
    out = points.copy()
    out[:, 0], out[:, 1] = c * points[:, 0] - s * points[:, 1], s * points[:, 0] + c * points[:, 1]
    if flip:
        out[:, 1] = -out[:, 1]
    return out


def _partners(items: list[tuple[object, str]], gap: int) -> dict[int, int]:
    """Index of frame t+gap: the scan ``gap`` places later in its source's recording order (``source.keys()``:
    a sequence's scan numbers, a bag's cloud stamps), when that scan is among the items."""
    where = {(id(source), key): i for i, (source, key) in enumerate(items)}
    orders: dict[int, tuple[list[str], dict[str, int]]] = {}
    out = {}
    for i, (source, key) in enumerate(items):
        if id(source) not in orders:
            keys = list(source.keys())
            orders[id(source)] = keys, {k: n for n, k in enumerate(keys)}
        keys, position = orders[id(source)]
        n = position.get(key, len(keys)) + gap
        if n < len(keys) and (id(source), keys[n]) in where:
            out[i] = where[(id(source), keys[n])]
    return out


__all__ = ["PretrainData", "Sample", "FrameItem"]
