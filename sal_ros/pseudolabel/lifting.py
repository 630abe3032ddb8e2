"""Lift 2D masks onto lidar points: project, test visibility, read the mask id at each point's pixel.

Naive lifting (Seal, SAL) gives every point that projects into a mask that mask's id. The lidar sees around
objects the camera cannot (it sits elsewhere, and the sweep is not instantaneous), so points *behind* a car
project onto the car's mask and inherit its id ("bleeding"). The occlusion test keeps a point only if no point
in its pixel neighbourhood is clearly nearer: a z-buffer over cells of ``cell_px`` pixels holds the nearest
depth per cell, a point is hidden when some cell within ``radius_cells`` (columns, rows) holds a depth more than
``abs_tol + rel_tol * depth`` in front of it. The window is wider than tall by default: scan lines are far apart
vertically (a 32-beam lidar's rings are ~30 px apart in a nuScenes image) and a tall window would let the road in
front hide the road behind.

Everything is vectorized numpy: one projection, one ``np.minimum.at`` and a few gathers per camera.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sal_ros.core.errors import CalibrationError


@dataclass
class LiftConfig:
    min_depth: float = 1.0  # metres in front of the camera (nuScenes devkit convention)
    occlusion: bool = True  # False = naive lifting (Seal / SAL)
    cell_px: int = 4
    radius_cells: tuple[int, int] = (2, 1)  # (columns, rows) around a point's cell
    rel_tol: float = 0.1
    abs_tol: float = 0.5  # metres


@dataclass
class PointPixels:
    """Points of a frame that project into one image."""

    index: np.ndarray  # (P,) int64 point indices
    u: np.ndarray  # (P,) int64 pixel column
    v: np.ndarray  # (P,) int64 pixel row
    depth: np.ndarray  # (P,) float32 metres along the optical axis
    visible: np.ndarray  # (P,) bool, passed the occlusion test (all True for naive lifting)


def project_view(points: np.ndarray, view, min_depth: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, uv (P, 2) float, depth (P,)) of the points in front of the camera and inside its image."""
    from sal_ros.core.camera import project_points

    T = np.asarray(view.T_cam_lidar, np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise CalibrationError(f"camera {view.name}: T_cam_lidar must be a finite 4x4 matrix, got {T.shape}")
    proj = project_points(points, T, view.camera, min_depth)
    h, w = view.image.shape[:2]
    uv = np.asarray(proj.uv, np.float64)
    valid = np.asarray(proj.valid, bool) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    index = np.flatnonzero(valid)
    return index, uv[index], np.asarray(proj.depth, np.float32)[index]


def visible(u: np.ndarray, v: np.ndarray, depth: np.ndarray, shape: tuple[int, int],
            config: LiftConfig = LiftConfig()) -> np.ndarray:
    """(P,) bool: the point is not hidden behind nearer points around its pixel (see module doc)."""
    if not config.occlusion or depth.size == 0:
        return np.ones(depth.size, bool)
    cell = max(int(config.cell_px), 1)
    ru, rv = (int(r) for r in config.radius_cells)
    hc, wc = -(-shape[0] // cell), -(-shape[1] // cell)
    cu, cv = u // cell + ru, v // cell + rv  # padded grid: no bounds checks in the gathers
    zbuf = np.full((hc + 2 * rv, wc + 2 * ru), np.inf, np.float32)
    np.minimum.at(zbuf, (cv, cu), depth)
    nearest = np.full(depth.size, np.inf, np.float32)
    for dv in range(-rv, rv + 1):
        for du in range(-ru, ru + 1):
            np.minimum(nearest, zbuf[cv + dv, cu + du], out=nearest)
    return depth - nearest <= config.abs_tol + config.rel_tol * depth


def point_pixels(points: np.ndarray, view, config: LiftConfig = LiftConfig()) -> PointPixels:
    index, uv, depth = project_view(points, view, config.min_depth)
    u, v = uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64)
    return PointPixels(index, u, v, depth, visible(u, v, depth, view.image.shape[:2], config))


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
