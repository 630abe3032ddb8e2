"""Extrinsics from a live tf2 buffer (/tf, /tf_static) and the factory the nodes pick a source with.

The fixed sources (``StaticExtrinsics`` from a YAML or calibrations) and the ``ExtrinsicsSource`` seam are in
``sal_ros.core.tf``; this is the one that needs rclpy and tf2_ros, so it lives with the nodes.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Mapping

import numpy as np

from sal_ros.core.calibration import CameraCalibration
from sal_ros.core.tf import ExtrinsicsSource, StaticExtrinsics
from sal_ros.core.transforms import transform_msg_to_matrix

_EARLIEST = 1  # ns; only a static chain has a transform this early (a dynamic one would extrapolate)


class Tf2Unavailable(ImportError):
    """tf2_ros cannot be imported (no ROS 2 install sourced)."""


def _import_tf2() -> Any:
    try:
        import tf2_ros
    except ImportError as exc:
        raise Tf2Unavailable(
            "extrinsics from TF need tf2_ros, which is not importable here "
            f"({exc}); source a ROS 2 install that has it (apt: ros-<distro>-tf2-ros), or set "
            "calibration.source to 'static' with a static-extrinsics YAML (see sal_ros.core.calibration)"
        ) from exc
    return tf2_ros


class Tf2Extrinsics:
    """Extrinsics from /tf and /tf_static through a tf2 buffer filled by a listener on ``node``.

    Lookups are at the cloud stamp. A transform not there yet is waited for until ``wait_s`` past the cloud stamp
    on the node's clock (sim time in replays; at most 10 x ``wait_s`` + 1 s of wall time, should that clock
    stand still): tf publishers run at their own rates, so the transform for a cloud's stamp may arrive after the
    cloud. The buffer is filled by the listener's callbacks meanwhile, so the caller must not be one of them. A
    frame pair whose chain is all static is cached once found. With ``allow_latest`` a stamp the buffer cannot
    serve (extrapolation) falls back to the latest transform, which is only right for rigs whose camera-lidar
    chain does not move.
    """

    def __init__(self, node: Any, cache_time_s: float = 10.0, allow_latest: bool = False, wait_s: float = 0.0) -> None:
        tf2_ros = _import_tf2()
        from rclpy.duration import Duration

        self._tf2 = tf2_ros
        self._clock = node.get_clock()
        self._clock_type = self._clock.clock_type
        self.wait_ns = max(0, int(round(wait_s * 1e9)))
        self.buffer = tf2_ros.Buffer(cache_time=Duration(seconds=float(cache_time_s)), node=node)
        self.listener = tf2_ros.TransformListener(self.buffer, node, spin_thread=False)
        self.allow_latest = allow_latest
        self._static: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.last_error: dict[tuple[str, str], str] = {}  # why the last lookup of a pair failed, for warnings

    def lookup(self, camera_frame: str, lidar_frame: str, stamp_ns: int) -> np.ndarray | None:
        T = self.lookup_now(camera_frame, lidar_frame, stamp_ns)
        if T is None and self.wait_ns:
            wall_deadline = time.monotonic() + 10 * self.wait_ns / 1e9 + 1.0
            while T is None and self._clock.now().nanoseconds < stamp_ns + self.wait_ns \
                    and time.monotonic() < wall_deadline:
                time.sleep(0.005)
                T = self.lookup_now(camera_frame, lidar_frame, stamp_ns)
        return T

    def lookup_now(self, camera_frame: str, lidar_frame: str, stamp_ns: int) -> np.ndarray | None:
        """T_cam_lidar at ``stamp_ns`` from what the buffer holds now (no waiting)."""
        pair = (camera_frame, lidar_frame)
        with self._lock:
            cached = self._static.get(pair)
        if cached is not None:
            return cached
        T = self._lookup_at(pair, stamp_ns)
        if T is None and self.allow_latest:
            T = self._lookup_at(pair, 0)  # tf2: time 0 = latest common time
        if T is not None:
            self.last_error.pop(pair, None)
        if T is not None and self._lookup_at(pair, _EARLIEST, record=False) is not None:
            T.setflags(write=False)
            with self._lock:
                self._static[pair] = T
        return T

    def _lookup_at(self, pair: tuple[str, str], stamp_ns: int, record: bool = True) -> np.ndarray | None:
        from rclpy.time import Time

        when = Time(nanoseconds=int(stamp_ns), clock_type=self._clock_type)
        try:
            msg = self.buffer.lookup_transform(pair[0], pair[1], when)
        except self._tf2.TransformException as exc:
            if record:
                self.last_error[pair] = str(exc)
            return None
        return transform_msg_to_matrix(msg)


def make_extrinsics_source(
    kind: str,
    *,
    node: Any = None,
    calibs: Mapping[str, CameraCalibration] | Iterable[CameraCalibration] | None = None,
    path: str | None = None,
    cache_time_s: float = 10.0,
    allow_latest: bool = False,
    wait_s: float = 0.0,
) -> ExtrinsicsSource:
    """``"tf"``: a Tf2Extrinsics on ``node`` (waiting up to ``wait_s`` past the cloud stamp); ``"static"``:
    StaticExtrinsics from ``calibs`` or the YAML ``path``."""
    if kind == "tf":
        if node is None:
            raise ValueError("extrinsics source 'tf' needs a node")
        return Tf2Extrinsics(node, cache_time_s=cache_time_s, allow_latest=allow_latest, wait_s=wait_s)
    if kind == "static":
        if calibs is not None:
            return StaticExtrinsics(calibs)
        if path:
            return StaticExtrinsics.from_yaml(path)
        raise ValueError("extrinsics source 'static' needs calibs or a YAML path")
    raise ValueError(f"unknown extrinsics source {kind!r} (expected 'tf' or 'static')")
