"""Point-cloud augmentations for distillation. All take an explicit ``np.random.Generator`` (determinism)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sal_ros.core.settings import known_settings


def rotate_z(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)
    return points @ rot.T


def azimuth_center(points: np.ndarray) -> float:
    """Circular mean of the points' azimuths (rad): where a frustum crop looks."""
    if len(points) == 0:
        return 0.0
    ang = np.arctan2(points[:, 1], points[:, 0])
    return float(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()))


@dataclass
class AugmentConfig:
    rotate: bool = True  # uniform rotation about z
    flip_x: float = 0.5  # probability of mirroring x -> -x
    flip_y: float = 0.5
    scale: tuple[float, float] = (0.95, 1.05)  # isotropic
    jitter_std: float = 0.01  # m, per point
    jitter_clip: float = 0.05

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = known_settings(cls, d, "augmentation")
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)


def augment(points: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Rotation about z, flips, scaling and jitter; labels are unchanged, so only points are returned."""
    pts = np.asarray(points, np.float32)
    if cfg.rotate:
        pts = rotate_z(pts, rng.uniform(-np.pi, np.pi))
    flip = np.ones(3, np.float32)
    if rng.random() < cfg.flip_x:
        flip[0] = -1
    if rng.random() < cfg.flip_y:
        flip[1] = -1
    pts = pts * (flip * np.float32(rng.uniform(*cfg.scale)))
    if cfg.jitter_std > 0:
        noise = rng.normal(0.0, cfg.jitter_std, pts.shape).clip(-cfg.jitter_clip, cfg.jitter_clip)
        pts = pts + noise.astype(np.float32)
    return pts.astype(np.float32, copy=False)
