"""Lift 2D masks onto lidar points: project, test visibility, read the mask id at each point's pixel.

Naive lifting (Seal, SAL) gives every point that projects into a mask that mask's id. The lidar sees around
objects the camera cannot (it sits elsewhere, and the sweep is not instantaneous), so points *behind* a car
project onto the car's mask and inherit its id ("bleeding").

The occlusion test hides a point when a clearly nearer point lies within its *footprint*. A lidar sample
stands for the surface up to about half-way to its neighbours: f * angular spacing * range / depth pixels, which
is constant in pixels (range ~ depth for a camera near the lidar), so the footprint does not shrink with depth.
A point inside a nearer object's silhouette has one of that object's samples within half a spacing in each
direction, while neighbouring samples of its own surface sit a full spacing away; the search box is therefore
``footprint`` spacings (0.5..1) of ``lidar_spacing_deg`` around the point, in pixels of each camera. "Clearly
nearer" is ``abs_tol + rel_tol * depth``: depth noise and slanted surfaces grow with depth. A box much wider
than the samples (the former fixed 20 x 12 px) hides a halo around every near object: at 50 m, most points.

Vectorized numpy, per camera: one projection, one ``np.minimum.at`` into a z-buffer of cells of half the box, a
separable 5 x 5 minimum filter over it and one gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sal_ros.core.camera import project_view


# Datasheet sample spacing (azimuth, elevation) in degrees of the lidar of each dataset kind sal_ros reads.
LIDAR_SPACING_DEG = {"semantickitti": (0.18, 0.33), "kitti_object": (0.18, 0.33), "kitti_frustum": (0.18, 0.33),
                     "nuscenes": (0.33, 1.33)}  # HDL-64E at 10 Hz; HDL-32E at 20 Hz


@dataclass
class LiftConfig:
    min_depth: float = 1.0  # metres in front of the camera (nuScenes devkit convention)
    occlusion: bool = True  # False = naive lifting (Seal / SAL)
    # (azimuth, elevation) degrees between neighbouring lidar samples; default KITTI's HDL-64E (upper block)
    lidar_spacing_deg: tuple[float, float] = LIDAR_SPACING_DEG["semantickitti"]
    # occluder search box half-size in spacings: >= 0.5 closes the gaps between an occluder's samples, and the
    # 1..1.5x the cells search stays short of the point's own neighbours (1 spacing away)
    footprint: float = 0.6
    rel_tol: float = 0.15
    abs_tol: float = 0.5  # metres


def lidar_spacing_for(kind: str) -> tuple[float, float]:
    """Sample spacing of a dataset kind's lidar (FrameSource.kind); the default for others (recordings)."""
    return LIDAR_SPACING_DEG.get(kind, LiftConfig.lidar_spacing_deg)


@dataclass
class PointPixels:
    """Points of a frame that project into one image."""

    index: np.ndarray  # (P,) int64 point indices
    u: np.ndarray  # (P,) int64 pixel column
    v: np.ndarray  # (P,) int64 pixel row
    depth: np.ndarray  # (P,) float32 metres along the optical axis
    visible: np.ndarray  # (P,) bool, passed the occlusion test (all True for naive lifting)


def footprint_px(camera, config: LiftConfig = LiftConfig()) -> tuple[float, float]:
    """(columns, rows) half-size of the occluder search box in this camera's pixels (see module doc)."""
    az, el = np.radians(np.asarray(config.lidar_spacing_deg, np.float64))
    return float(config.footprint * camera.K[0, 0] * az), float(config.footprint * camera.K[1, 1] * el)


RADIUS = 2  # cells each side of a point's cell: the box is searched to 1..1.5x its size


def visible(u: np.ndarray, v: np.ndarray, depth: np.ndarray, shape: tuple[int, int],
            config: LiftConfig = LiftConfig(), box_px: tuple[float, float] = (2.0, 3.0)) -> np.ndarray:
    """(P,) bool: no clearly nearer point within ``box_px`` (columns, rows) of the point (see module doc)."""
    if not config.occlusion or depth.size == 0:
        return np.ones(depth.size, bool)
    cw, ch = (max(float(b), 0.5) / RADIUS for b in box_px)  # float cells: small boxes are not rounded up
    rows, cols = int(shape[0] / ch) + 1, int(shape[1] / cw) + 1
    cell = np.floor(v / ch).astype(np.intp) * cols + np.floor(u / cw).astype(np.intp)
    zbuf = np.full(rows * cols, np.inf, np.float32)
    np.minimum.at(zbuf, cell, depth)  # flat index: several times faster than a (row, col) tuple
    nearest = _min_filter(_min_filter(zbuf.reshape(rows, cols), 1), 0).ravel()[cell]  # separable 5 x 5
    return depth - nearest <= config.abs_tol + config.rel_tol * depth


def _min_filter(a: np.ndarray, axis: int) -> np.ndarray:
    """Minimum over RADIUS cells either side along ``axis``."""
    out = a.copy()
    src, dst = np.moveaxis(a, axis, 0), np.moveaxis(out, axis, 0)
    for k in range(1, RADIUS + 1):
        np.minimum(dst[k:], src[:-k], out=dst[k:])
        np.minimum(dst[:-k], src[k:], out=dst[:-k])
    return out


def point_pixels(points: np.ndarray, view, config: LiftConfig = LiftConfig()) -> PointPixels:
    index, uv, depth = project_view(points, view, config.min_depth)
    vis = visible(uv[:, 0], uv[:, 1], depth, view.image.shape[:2], config, footprint_px(view.camera, config))
    return PointPixels(index, uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64), depth, vis)


def lift_labels(pixels: PointPixels, masks, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Per point of the frame: (mask id (N,) int32, -1 = none; visible (N,) bool) from ``Masks``
    (sal_ros.pseudolabel.masks; overlapping masks: the smaller wins) or an (H, W) int label image."""
    mask_id = np.full(num_points, -1, np.int32)
    seen = np.zeros(num_points, bool)
    keep = pixels.visible
    idx = pixels.index[keep]
    rows, cols = pixels.v[keep], pixels.u[keep]
    mask_id[idx] = masks.ids_at(rows, cols) if hasattr(masks, "ids_at") else masks[rows, cols]
    seen[idx] = True
    return mask_id, seen


def in_image(pixels: PointPixels, num_points: int) -> np.ndarray:
    out = np.zeros(num_points, bool)
    out[pixels.index] = True
    return out
