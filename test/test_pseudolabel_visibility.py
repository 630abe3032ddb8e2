"""The occlusion test on real scans: points behind a nearer object are hidden, far background with nothing in front
of it is kept, and what it hides is mostly a real occlusion per the ground truth (SemanticKITTI labels)."""
import argparse

import numpy as np
import pytest
from conftest import require_data

from sal_ros.data.labels import semantickitti
from sal_ros.data.sources import FrameSource
from sal_ros.pseudolabel.cli import add_arguments, config_from_args
from sal_ros.pseudolabel.lifting import LIDAR_SPACING_DEG, LiftConfig, footprint_px, point_pixels, visible


@pytest.fixture(scope="module")
def kitti_frame():
    source = FrameSource(require_data("semantickitti", "sequences", "00"))
    return source.load(source.keys()[0])


def _gt_surface(px, segment: np.ndarray, shape, splat=(2, 3)) -> tuple[np.ndarray, np.ndarray]:
    """(segment, depth) of the nearest ground-truth surface at each point's pixel: every point paints a splat of
    its segment, the nearest point wins each pixel (how the oracle masks are rendered)."""
    h, w = shape
    du, dv = (g.ravel() for g in np.meshgrid(np.arange(-splat[0], splat[0] + 1), np.arange(-splat[1], splat[1] + 1)))
    u, v = (px.u[:, None] + du).ravel(), (px.v[:, None] + dv).ravel()
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    pix, depth, seg = (v * w + u)[ok], np.repeat(px.depth, du.size)[ok], np.repeat(segment, du.size)[ok]
    order = np.lexsort((depth, pix))
    first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]  # nearest point of each pixel
    image, zbuf = np.zeros(h * w, np.int64), np.full(h * w, np.inf, np.float32)
    image[pix[first]], zbuf[pix[first]] = seg[first], depth[first]
    at = px.v * w + px.u
    return image[at], zbuf[at]


def _wall(distance: float, spacing_deg=LIDAR_SPACING_DEG["semantickitti"]) -> np.ndarray:
    """A flat wall ``distance`` m ahead of the lidar (x forward), sampled on the lidar's angular grid."""
    az, el = np.meshgrid(np.radians(np.arange(-8, 8, spacing_deg[0])), np.radians(np.arange(-4, 1, spacing_deg[1])))
    rays = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    return (rays * (distance / rays[:, :1])).astype(np.float32)


@pytest.mark.parametrize("distance", [6.0, 15.0])
def test_real_points_behind_a_nearer_wall_are_hidden(kitti_frame, distance):
    """A wall put into the real scan hides the real points behind it (all of them inside its silhouette), and
    leaves points more than one and a half search boxes beyond its edges as they were."""
    view = next(iter(kitti_frame.cameras.values()))
    n = kitti_frame.num_points
    before = point_pixels(kitti_frame.points, view)
    px = point_pixels(np.concatenate([kitti_frame.points, _wall(distance)]), view)
    real, wall = px.index < n, px.index >= n
    assert px.visible[wall].all()
    box = np.array(footprint_px(view.camera))
    spacing = box / LiftConfig().footprint
    uv = np.stack([px.u, px.v], 1)
    lo, hi = uv[wall].min(0), uv[wall].max(0)
    clearly_behind = px.depth > (distance + 0.6) / (1 - LiftConfig().rel_tol)
    behind = real & np.all((uv >= lo + spacing) & (uv <= hi - spacing), 1) & clearly_behind
    assert behind.sum() > 300
    assert not px.visible[behind].any()
    away = real & np.any((uv < lo - 1.5 * box - 1) | (uv > hi + 1.5 * box + 1), 1)  # +1: pixel truncation
    was = dict(zip(before.index, before.visible))
    assert np.array_equal(px.visible[away], [was[i] for i in px.index[away]])


def test_far_background_with_nothing_in_front_is_kept(kitti_frame):
    """Buildings and vegetation beyond 30 m whose pixel shows their own segment per ground truth (nothing nearer
    in front) keep their labels. The former fixed 20 x 12 px z-buffer hid 28% of them (and 38-73% of all points
    beyond 30 m)."""
    view = next(iter(kitti_frame.cameras.values()))
    px = point_pixels(kitti_frame.points, view)
    labels = semantickitti()
    cls = labels.split(kitti_frame.gt_labels)[0][px.index]
    segment = kitti_frame.gt_labels[px.index].astype(np.int64) + 1
    unoccluded = _gt_surface(px, segment, view.image.shape[:2])[0] == segment
    far_bg = np.isin(cls, [labels.class_id("building"), labels.class_id("vegetation")]) & (px.depth > 30)
    assert (far_bg & unoccluded).sum() > 300
    assert px.visible[far_bg & unoccluded].mean() > 0.97
    assert (~px.visible[px.depth > 30]).mean() < 0.15


def test_hidden_points_are_occluded_by_another_object(kitti_frame):
    """Precision and recall against the ground truth: a hidden point's pixel shows another, nearer segment (real
    occlusion); most points whose pixel shows another segment clearly in front are hidden."""
    view = next(iter(kitti_frame.cameras.values()))
    px = point_pixels(kitti_frame.points, view)
    segment = kitti_frame.gt_labels[px.index].astype(np.int64) + 1
    shown, shown_depth = _gt_surface(px, segment, view.image.shape[:2])
    hidden = ~px.visible
    assert 0.005 < hidden.mean() < 0.08  # occlusion by a ~0.3 m lidar-camera offset is a few percent
    assert (shown[hidden] != segment[hidden]).mean() > 0.9  # the former z-buffer: 0.35
    behind_other = (shown != segment) & (shown_depth < px.depth - (0.5 + 0.05 * px.depth))
    assert behind_other.sum() > 200 and hidden[behind_other].mean() > 0.6


def test_visible_box_is_exact_to_one_and_a_half_times():
    """One occluder at 5 m, background samples around it at 20 m: hidden exactly within the box (1..1.5x)."""
    du, dv = np.meshgrid(np.arange(-12.0, 12.5, 0.5), np.arange(-12.0, 12.5, 0.5))
    u, v = np.r_[50.3, 50.3 + du.ravel()], np.r_[40.7, 40.7 + dv.ravel()]
    depth = np.r_[5.0, np.full(du.size, 20.0)].astype(np.float32)
    box = (3.0, 6.0)
    hidden = ~visible(u, v, depth, (100, 120), LiftConfig(), box)[1:]
    off = np.abs(np.stack([du.ravel(), dv.ravel()], 1))
    assert hidden[np.all(off < box, 1)].all()
    assert not hidden[np.any(off > 1.5 * np.array(box), 1)].any()
    assert visible(u, v, depth, (100, 120), LiftConfig(occlusion=False), box).all()


def test_footprint_follows_the_lidar_and_the_camera():
    """The search box is the lidar's angular spacing in this camera's pixels, not a fixed pixel size."""
    nus = FrameSource(require_data("nuscenes_mini"))
    front = nus.load(nus.keys()[0]).cameras["CAM_FRONT"]
    k = front.camera.K
    cfg = LiftConfig(lidar_spacing_deg=LIDAR_SPACING_DEG["nuscenes"])
    np.testing.assert_allclose(footprint_px(front.camera, cfg),
                               (cfg.footprint * k[0, 0] * np.radians(0.33), cfg.footprint * k[1, 1] * np.radians(1.33)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--masks", "slic", "--no-tokens"]
    args = parser.parse_args([str(require_data("nuscenes_mini")), *base])
    assert config_from_args(args).lift.lidar_spacing_deg == LIDAR_SPACING_DEG["nuscenes"]
    kitti = str(require_data("semantickitti", "sequences", "00"))
    assert config_from_args(parser.parse_args([kitti, *base])).lift.lidar_spacing_deg == (0.18, 0.33)
    given = parser.parse_args([kitti, *base, "--lidar-spacing-deg", "0.35", "0.7"])
    assert config_from_args(given).lift.lidar_spacing_deg == (0.35, 0.7)
