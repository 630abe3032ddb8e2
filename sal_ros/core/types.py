"""Frame and Segmentation: the data every later layer shares.

Conventions (used everywhere in sal_ros):
- time stamps are integer nanoseconds (``stamp_ns``), as in ROS 2 builtin_interfaces/Time and rosbag2;
- points are float32 ``(N, 3)`` in the lidar frame; arrays indexed per point keep the input's order;
- ``T_cam_lidar`` is a float64 4x4 transform taking lidar coordinates to the camera optical frame
  (x right, y down, z forward);
- segmentation ``label`` 0 means "no class"; label ``k >= 1`` is vocabulary class ``k - 1``;
  ``instance`` 0 means "no instance" (stuff or unassigned), instance ids are unique within one frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNLABELED = 0
NO_INSTANCE = 0


@dataclass
class CameraView:
    """One camera image synced to a lidar sweep, with what is needed to project points into it."""

    name: str  # camera id: "image_0", "CAM_FRONT", or the configured camera name
    image: np.ndarray  # (H, W) uint8/uint16/float32 mono or (H, W, 3) uint8 RGB
    camera: Any  # sal_ros.core.camera.CameraModel (intrinsics, distortion, size)
    T_cam_lidar: np.ndarray  # (4, 4) float64, lidar -> camera optical frame, at the cloud stamp
    stamp_ns: int = 0
    frame_id: str = ""  # camera optical frame id


@dataclass
class Frame:
    """One lidar sweep and the camera views synced to it."""

    stamp_ns: int
    frame_id: str  # lidar frame id
    points: np.ndarray  # (N, 3) float32 xyz
    intensity: np.ndarray | None = None  # (N,) float32
    cameras: dict[str, CameraView] = field(default_factory=dict)
    missing_cameras: tuple[str, ...] = ()  # configured cameras that had no match (partial frame)
    camera_problems: dict[str, str] = field(default_factory=dict)  # left-out camera -> why (file missing, unreadable)
    key: str = ""  # stable id for files on disk, e.g. "00_000000" or the stamp
    gt_labels: np.ndarray | None = None  # (N,) uint32 SemanticKITTI-style panoptic label (semantic | instance << 16)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def is_partial(self) -> bool:
        return bool(self.missing_cameras)


@dataclass
class OrientedBox:
    """A 3D box in the lidar frame: centre, size (length along heading, width, height), yaw about z (rad)."""

    center: np.ndarray  # (3,)
    size: np.ndarray  # (3,) l, w, h
    yaw: float = 0.0


@dataclass
class InstanceSummary:
    instance_id: int
    label: int  # vocabulary class index + 1
    class_name: str
    score: float
    num_points: int
    box: OrientedBox
    # top classes of the instance, best first: (label, probability over the vocabulary); empty when unknown
    class_scores: tuple[tuple[int, float], ...] = ()


@dataclass
class Segmentation:
    """Per-point result for one Frame, same length and order as ``Frame.points``."""

    label: np.ndarray  # (N,) uint16
    instance: np.ndarray  # (N,) uint32
    score: np.ndarray  # (N,) float32 in [0, 1]
    instances: list[InstanceSummary] = field(default_factory=list)
    class_names: tuple[str, ...] = ()  # vocabulary classes, index k-1 for label k
    vocabulary_version: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    # points the model could not take, by reason (nonfinite, out_of_range): they carry label 0
    dropped_points: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int, class_names: tuple[str, ...] = (), vocabulary_version: int = 0) -> "Segmentation":
        return cls(
            label=np.zeros(n, np.uint16),
            instance=np.zeros(n, np.uint32),
            score=np.zeros(n, np.float32),
            class_names=tuple(class_names),
            vocabulary_version=vocabulary_version,
        )
