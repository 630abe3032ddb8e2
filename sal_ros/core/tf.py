"""Where lidar->camera extrinsics come from: fixed calibrations (YAML, datasets) and recorded TF here; the live tf2
buffer of a robot in ``sal_ros.nodes.extrinsics`` (it needs rclpy and tf2_ros, which core never imports).

Both implement ``ExtrinsicsSource.lookup(camera_frame, lidar_frame, stamp_ns)``: ``T_cam_lidar`` (4x4 float64)
at the cloud stamp, or None when it is not (yet) available. The nodes call it on their worker thread, never in a
callback; a tf2 source may wait there for a transform published after the cloud, up to ``wait_s`` past the
cloud stamp on the node's clock (the sync timeout), and the camera is left out of the frame when it returns None.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

from sal_ros.core.calibration import CameraCalibration, read_static_extrinsics
from sal_ros.core.transforms import (invert_transform, make_transform, matrix_to_quaternion, quaternion_to_matrix,
                                     transform_msg_to_matrix)

@runtime_checkable
class ExtrinsicsSource(Protocol):
    def lookup(self, camera_frame: str, lidar_frame: str, stamp_ns: int) -> np.ndarray | None:
        """T_cam_lidar at ``stamp_ns``, or None when not available; blocks at most the source's own wait."""
        ...


class StaticExtrinsics:
    """Fixed calibrations, matched by camera frame id (or camera name) and lidar frame id; time-independent."""

    def __init__(self, calibs: Mapping[str, CameraCalibration] | Iterable[CameraCalibration]) -> None:
        items = list(calibs.values()) if isinstance(calibs, Mapping) else list(calibs)
        self._by_frame: dict[tuple[str, str], np.ndarray] = {}
        for c in items:
            T = np.array(c.T_cam_lidar, dtype=np.float64)
            T.setflags(write=False)  # shared with every caller; nobody may edit the calibration in place
            self._by_frame[(c.frame_id, c.lidar_frame_id)] = T
            self._by_frame.setdefault((c.name, c.lidar_frame_id), T)
        self.calibrations = {c.name: c for c in items}

    @classmethod
    def from_yaml(cls, path: str) -> "StaticExtrinsics":
        return cls(read_static_extrinsics(path))

    def lookup(self, camera_frame: str, lidar_frame: str, stamp_ns: int = 0) -> np.ndarray | None:
        return self._by_frame.get((camera_frame, lidar_frame))


class StaticTfTree:
    """A tree of static transforms (a bag's /tf_static); ``lookup`` chains them in either direction."""

    def __init__(self, edges: Mapping[tuple[str, str], np.ndarray]) -> None:
        self._edges: dict[str, list[tuple[str, np.ndarray]]] = {}
        for (parent, child), T_parent_child in edges.items():
            self._edges.setdefault(parent, []).append((child, T_parent_child))
            self._edges.setdefault(child, []).append((parent, invert_transform(T_parent_child)))

    @classmethod
    def from_transforms(cls, transforms: Iterable[Any]) -> "StaticTfTree":
        """From TransformStamped messages (rclpy or rosbags); a later one of a parent/child pair wins."""
        return cls({(str(tf.header.frame_id), str(tf.child_frame_id)): transform_msg_to_matrix(tf)
                    for tf in transforms})

    @property
    def frames(self) -> set[str]:
        return set(self._edges)

    def lookup(self, camera_frame: str, lidar_frame: str, stamp_ns: int = 0) -> np.ndarray | None:
        """T_camera_lidar (maps lidar coordinates into the camera frame), breadth first over the tree."""
        seen, queue = {lidar_frame}, deque([(lidar_frame, np.eye(4))])
        while queue:
            frame, T_frame_lidar = queue.popleft()
            if frame == camera_frame:
                return T_frame_lidar
            for other, T_frame_other in self._edges.get(frame, []):
                if other not in seen:  # T_frame_other maps other into frame; we need T_other_lidar
                    seen.add(other)
                    queue.append((other, invert_transform(T_frame_other) @ T_frame_lidar))
        return None


class TfHistory:
    """/tf over time plus /tf_static, as a bag holds them; ``lookup`` chains the tree at a stamp as tf2 does: each
    moving edge interpolated between its messages around the stamp (translation linear, rotation slerp), never
    extrapolated past its first or last message."""

    def __init__(self) -> None:
        self.static: dict[tuple[str, str], np.ndarray] = {}
        self.moving: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
        self._series: dict[tuple[str, str], tuple[np.ndarray, list[np.ndarray]]] | None = None

    def add(self, transforms: Iterable[Any], static: bool) -> None:
        """TransformStamped messages (rclpy or rosbags) of /tf (``static`` False) or /tf_static."""
        for tf in transforms:
            pair, T = (str(tf.header.frame_id), str(tf.child_frame_id)), transform_msg_to_matrix(tf)
            if static:
                self.static[pair] = T
            else:
                stamp = int(tf.header.stamp.sec) * 1_000_000_000 + int(tf.header.stamp.nanosec)
                self.moving.setdefault(pair, []).append((stamp, T))
        self._series = None

    def at(self, stamp_ns: int) -> StaticTfTree:
        """The tree at ``stamp_ns``: static edges and the moving edges whose messages span the stamp."""
        if self._series is None:
            self._series = {pair: (np.array([s for s, _ in items], np.int64), [T for _, T in items])
                            for pair, items in ((p, sorted(v, key=lambda m: m[0])) for p, v in self.moving.items())}
        edges = dict(self.static)
        for pair, (stamps, Ts) in self._series.items():
            T = _interpolate(stamps, Ts, stamp_ns)
            if T is not None:
                edges[pair] = T
        return StaticTfTree(edges)

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int) -> np.ndarray | None:
        """T_target_source at ``stamp_ns`` (maps source coordinates into the target frame), or None."""
        return self.at(stamp_ns).lookup(target_frame, source_frame)


def _interpolate(stamps: np.ndarray, Ts: list[np.ndarray], t: int) -> np.ndarray | None:
    i = int(np.searchsorted(stamps, t))  # first message at or after t
    if i < len(stamps) and stamps[i] == t:
        return Ts[i]
    if i == 0 or i == len(stamps):
        return None
    a = float(t - stamps[i - 1]) / float(stamps[i] - stamps[i - 1])
    T0, T1 = Ts[i - 1], Ts[i]
    q = _slerp(matrix_to_quaternion(T0), matrix_to_quaternion(T1), a)
    return make_transform(quaternion_to_matrix(q), (1 - a) * T0[:3, 3] + a * T1[:3, 3])


def _slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    d = float(np.dot(q0, q1))
    if d < 0:  # the shorter arc
        q1, d = -q1, -d
    if d > 0.9995:  # nearly equal: linear is exact enough and avoids dividing by sin(~0)
        q = q0 + a * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(d)
    return (np.sin((1 - a) * theta) * q0 + np.sin(a * theta) * q1) / np.sin(theta)
