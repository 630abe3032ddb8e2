"""PNGs of a scan: input, each run's pseudo-labels and student, ground truth; bird's-eye view and camera overlay.
Segments take the colours of sal_ros.core.palette, the node's palette."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sal_ros.core.palette import segment_colors
from sal_ros.demo.metrics import FrameResult
from sal_ros.demo.settings import ORACLE

STUDENT_ID_STRIDE = 100003  # label * stride + instance: one id per (class, instance) of the student
SHORT_TITLES = {"slic": "SLIC", "sam2": "SAM 2", ORACLE: "oracle masks"}


def _rgb(colors: np.ndarray) -> np.ndarray:
    return colors.astype(np.float32) / 255.0


def panels(r: FrameResult) -> list[list[tuple[str, np.ndarray]]]:
    """Rows of (title, per-point RGB in 0..1): input and ground truth first, then per run pseudo-labels and student."""
    import matplotlib

    height = matplotlib.colormaps["viridis"](np.clip((r.points[:, 2] + 2.5) / 4.0, 0, 1))[:, :3]
    rows = [[("input (height)", height), ("ground truth", _rgb(segment_colors(r.gt_seg, r.gt_cls == 0)))]]
    for name, f in r.runs.items():
        title = SHORT_TITLES.get(name, name)
        student = f.label * STUDENT_ID_STRIDE + f.instance
        rows.append([(f"{title}: pseudo-labels (camera only)", _rgb(segment_colors(f.pseudo))),
                     (f"{title}: student (lidar only)", _rgb(segment_colors(student)))])
    return rows


def render_bev(path: Path, r: FrameResult, extent: float = 40.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.eval.report import atomic_savefig

    grid = panels(r)
    near = (np.abs(r.points[:, 0]) < extent) & (np.abs(r.points[:, 1]) < extent)
    fig, axes = plt.subplots(2, len(grid), figsize=(5 * len(grid), 10.6), squeeze=False)
    for col, pair in enumerate(grid):
        for row, (title, rgb) in enumerate(pair):
            ax = axes[row, col]
            ax.scatter(-r.points[near, 1], r.points[near, 0], c=rgb[near], s=0.15, linewidths=0)
            ax.set(title=title, xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
            ax.set_facecolor("black")
    fig.suptitle(f"bird's-eye view, scan {r.stamp_ns} (x forward = up, ±{extent:.0f} m)")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=90)
    finally:
        plt.close(fig)


def render_camera(path: Path, r: FrameResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.core.camera import project_points
    from sal_ros.eval.report import atomic_savefig

    view = r.camera
    proj = project_points(r.points, view.T_cam_lidar, view.camera, min_depth=1.0)
    uv = proj.uv[proj.valid]
    h, w = view.image.shape[:2]
    flat = [p for pair in panels(r) for p in pair]
    fig, axes = plt.subplots(len(flat), 1, figsize=(14, len(flat) * 14 * h / w + 1.2), squeeze=False)
    for ax, (title, rgb) in zip(axes[:, 0], flat):
        ax.imshow(view.image, cmap="gray" if view.image.ndim == 2 else None)
        ax.scatter(uv[:, 0], uv[:, 1], c=rgb[proj.valid], s=1.5, linewidths=0)
        ax.set(title=title, xlim=(0, w), ylim=(h, 0), xticks=[], yticks=[])
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=90)
    finally:
        plt.close(fig)
