"""The segmenter's instance tracking (sal_ros.core.tracking) as a node runs it: configured from the ``tracking.*``
parameters, in the sensor frame or, with ``tracking.fixed_frame``, in that frame through TF at the cloud stamp;
a missing transform or a tracker fault is counted and warned about and never costs the frame."""
from __future__ import annotations

from typing import Any

import numpy as np

from sal_ros.core.tracking import Tracker, TrackerConfig, TrackingResult, apply_tracks
from sal_ros.core.types import Frame, Segmentation
from sal_ros.nodes.stats import throttled


def tracker_config(values: dict) -> TrackerConfig:
    return TrackerConfig(max_distance=float(values["tracking.max_distance"]),
                         max_misses=int(values["tracking.max_misses"]),
                         class_memory=float(values["tracking.class_memory"]))


class NodeTracking:
    """The tracker of a node (``node.values``, ``node.stats``, ``node.health``, its logger) and the poses it
    tracks in."""

    def __init__(self, node: Any) -> None:
        self._node, self._values = node, node.values
        self.tracker = Tracker(tracker_config(self._values))
        self.poses = self._pose_source()
        self.last_pose: np.ndarray | None = None

    def configure(self) -> None:
        """The ``tracking.*`` parameters as they are now, from the next frame."""
        self.tracker.config = tracker_config(self._values)

    def _pose_source(self) -> Any:
        """A tf2 buffer for sensor -> ``tracking.fixed_frame`` lookups, or None (track in the sensor frame)."""
        if not self._values["tracking.fixed_frame"]:
            return None
        from sal_ros.nodes.extrinsics import make_extrinsics_source

        try:
            return make_extrinsics_source("tf", node=self._node)
        except ImportError as exc:
            self._node.get_logger().error(f"tracking.fixed_frame is set but TF is unavailable, tracking in the "
                                          f"sensor frame: {exc}")
            return None

    def pose(self, frame: Frame) -> np.ndarray | None:
        """Sensor -> fixed frame at the cloud stamp; the last one found when TF cannot say yet (counted)."""
        fixed = self._values["tracking.fixed_frame"]
        if self.poses is None or fixed == frame.frame_id:
            return None
        pose = self.poses.lookup(fixed, frame.frame_id, frame.stamp_ns)
        if pose is None:
            self._node.stats.count("tracking_pose_missing")
            why = getattr(self.poses, "last_error", {}).get((fixed, frame.frame_id), "no transform")
            self._node.get_logger().warning(f"no transform {frame.frame_id} -> {fixed} at the cloud stamp ({why}); "
                                            "tracking with the last known pose", **throttled())
            return self.last_pose
        self.last_pose = pose
        return pose

    def track(self, frame: Frame, seg: Segmentation) -> TrackingResult | None:
        """Track ids and smoothed classes into ``seg`` (in place); None when tracking is off."""
        if not self._values["tracking.enable"]:
            return None
        try:
            result = self.tracker.update(seg.instances, frame.stamp_ns, self.pose(frame), seg.vocabulary_version)
        except Exception as exc:  # noqa: BLE001 - a tracker fault must not cost the frame: publish it untracked
            node = self._node
            node.stats.count("error.tracking")
            node.health.error("tracking")
            self.tracker.reset()
            node.get_logger().warning(f"tracking failed, frame published with per-frame ids, tracks reset: "
                                      f"{type(exc).__name__}: {exc}", **throttled())
            return None
        apply_tracks(seg, result)
        return result

    def frame_of(self, tracking: TrackingResult | None, frame: Frame) -> str:
        """The frame ``tracking``'s tracks are in: the fixed frame once a pose was found, else the cloud's."""
        used_fixed = tracking is not None and self.last_pose is not None
        return self._values["tracking.fixed_frame"] if used_fixed else frame.frame_id
