"""The segmenter's publishers: which outputs someone listens to, and a frame's messages built and sent.

Only the worker thread publishes frames, each frame's messages before the next frame's are built, so one buffer
serves every labeled cloud and one pool every marker set. The vocabulary topics are published from whichever
thread activated a vocabulary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sal_ros.core.pointcloud2 import CloudEncoder
from sal_ros.core.tracking import TrackingResult
from sal_ros.core.types import Frame, Segmentation
from sal_ros.nodes import outputs
from sal_ros.nodes.qos import latched, profile

if TYPE_CHECKING:
    from sal_ros.model.vocabulary import Vocabulary

# Autoware's per-frame debug figures (ms), on ~/debug/<name>
DEBUG_TIMES = ("processing_time_ms", "cyclic_time_ms", "pipeline_latency_ms")


class SegmenterPublishers:
    """The segmenter node's output publishers (~/labeled_points, ~/markers, ~/info, ~/overlay/<camera>,
    ~/detections, ~/frame_summary, ~/filtered, ~/debug/*, ~/vocabulary, ~/debug/vocabulary) and the messages of a
    frame, built from the node's parameter ``values`` as they are when the frame is published."""

    def __init__(self, node: Any, cameras: list, types: Any, values: dict) -> None:
        from sensor_msgs.msg import Image, PointCloud2, Temperature
        from std_msgs.msg import String
        from vision_msgs.msg import Detection3DArray
        from visualization_msgs.msg import MarkerArray

        try:
            from sal_ros_msgs.msg import FrameSummary
            from sal_ros_msgs.msg import Vocabulary as VocabularyMsg
        except ImportError as exc:
            raise ImportError(f"{exc}: the sal_ros_msgs interfaces are not built. Build them with the package "
                              "(colcon build --base-paths src/sal_ros src/sal_ros/sal_ros_msgs, then source "
                              "install/setup.bash) or, without an apt ROS, `make setup` "
                              "(sal_ros_msgs/build_venv.sh)") from exc
        self._types, self._values = types, values
        qos = profile(values["qos.outputs.reliability"], values["qos.outputs.depth"])
        self.cloud = node.create_publisher(PointCloud2, "~/labeled_points", qos)
        self.cloud_encoder = CloudEncoder(types)
        self.markers = node.create_publisher(MarkerArray, "~/markers", qos)
        self.marker_pool = outputs.MarkerPool()
        self.info = node.create_publisher(String, "~/info", qos)
        self.overlays = {c.name: node.create_publisher(Image, f"~/overlay/{c.name}", qos) for c in cameras}
        self.detections = node.create_publisher(Detection3DArray, "~/detections", qos)
        self.summary = node.create_publisher(FrameSummary, "~/frame_summary", qos)
        self.filtered = node.create_publisher(PointCloud2, "~/filtered", qos)
        # Temperature: the closest standard stamped float (outputs.stamped_ms)
        self.debug = {name: node.create_publisher(Temperature, f"~/debug/{name}", qos) for name in DEBUG_TIMES}
        self._last_start: float | None = None  # when the previous processed frame started (cyclic time)
        self.vocabulary = node.create_publisher(VocabularyMsg, "~/vocabulary", latched())
        self.vocabulary_json = node.create_publisher(String, "~/debug/vocabulary", latched())

    def wanted(self) -> dict[str, Any]:
        """Which outputs are enabled and subscribed; overlays as the set of camera names."""
        v = self._values
        return {
            "labeled_points": v["publish.labeled_points"] and self.cloud.get_subscription_count() > 0,
            "markers": v["publish.markers"] and self.markers.get_subscription_count() > 0,
            "info": v["publish.info"] and self.info.get_subscription_count() > 0,
            "detections": v["publish.detections"] and self.detections.get_subscription_count() > 0,
            "frame_summary": v["publish.frame_summary"] and self.summary.get_subscription_count() > 0,
            "filtered": v["publish.filtered"] and self.filtered.get_subscription_count() > 0,
            "overlays": {name for name, pub in self.overlays.items()
                         if v["publish.overlays"] and pub.get_subscription_count() > 0},
        }

    def frame(self, frame: Frame, seg: Segmentation, wanted: dict[str, Any], tracking: TrackingResult | None = None,
              timings_ms: dict[str, float] | None = None, tracking_frame: str = "",
              send: Callable[[Any, Any], None] | None = None) -> None:
        """Build the wanted outputs of a frame and ``send(publisher, message)`` each (default: publish it);
        ``tracking_frame``: the frame tracks were kept in (default: the cloud's)."""
        from std_msgs.msg import String

        send = send or (lambda publisher, message: publisher.publish(message))
        v, types = self._values, self._types
        palette = outputs.class_palette(len(seg.class_names))
        if wanted.get("detections"):
            classes = None if tracking is None else {t.track_id: t.classes for t in tracking.by_instance.values()}
            send(self.detections, outputs.detections_message(
                seg.instances, frame.frame_id, frame.stamp_ns, seg.class_names, types, classes))
        if wanted.get("frame_summary"):
            send(self.summary, outputs.frame_summary_message(
                seg, frame.frame_id, frame.stamp_ns, frame.num_points, types, frame.missing_cameras,
                timings_ms, tracking, tracking_frame or frame.frame_id))
        if wanted["labeled_points"]:
            send(self.cloud, outputs.labeled_cloud(
                frame.points, frame.intensity, seg, frame.frame_id, frame.stamp_ns, types, palette,
                self.cloud_encoder))
        if wanted["info"]:
            record = outputs.frame_record(frame.stamp_ns, frame.frame_id, seg, frame.num_points, frame.missing_cameras)
            send(self.info, String(data=record))
        if wanted["markers"]:
            send(self.markers, outputs.instance_markers(
                seg.instances, frame.frame_id, frame.stamp_ns, palette, types, v["markers.min_points"],
                vocabulary_version=seg.vocabulary_version, tracked=tracking is not None, pool=self.marker_pool))
        for name in wanted["overlays"]:
            view = frame.cameras.get(name)
            if view is not None:
                send(self.overlays[name], outputs.overlay_message(
                    view, frame.points, seg.label, palette, v["overlay.point_radius"], types))

    def filtered_cloud(self, cloud_msg: Any, seg: Segmentation) -> None:
        """~/filtered: the input cloud without the points of ``filter.classes`` (by name, in the vocabulary the
        frame was segmented with; a name that vocabulary lacks removes nothing)."""
        removed = outputs.labels_to_remove(seg.class_names, self._values["filter.classes"])
        keep = ~np.isin(np.asarray(seg.label), removed)
        self.filtered.publish(outputs.filtered_cloud(cloud_msg, keep, self._types))

    def debug_times(self, frame: Frame, start: float, end: float, now_ns: int) -> None:
        """Autoware's debug figures of this frame: its work, the time since the previous frame's start, and the
        time since the sensor stamp (ROS clock; driver and transport included)."""
        cyclic = None if self._last_start is None else (start - self._last_start) * 1e3
        self._last_start = start
        if not self._values["publish.debug"]:
            return
        figures = {"processing_time_ms": (end - start) * 1e3, "cyclic_time_ms": cyclic,
                   "pipeline_latency_ms": (now_ns - frame.stamp_ns) / 1e6}
        for name, value in figures.items():
            pub = self.debug[name]
            if value is not None and pub.get_subscription_count() > 0:
                pub.publish(outputs.stamped_ms(value, frame.frame_id, frame.stamp_ns, self._types))

    def vocabulary_active(self, vocabulary: Vocabulary, text_encoder: str, stamp: Any, status_json: str) -> None:
        """~/vocabulary (each version once, transient local) and its debugging twin ~/debug/vocabulary."""
        self.vocabulary.publish(outputs.vocabulary_message(
            vocabulary, outputs.class_palette(len(vocabulary)), text_encoder, stamp))
        self.vocabulary_status(status_json)

    def vocabulary_status(self, status_json: str) -> None:
        from std_msgs.msg import String

        self.vocabulary_json.publish(String(data=status_json))
