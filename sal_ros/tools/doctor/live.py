"""Live checks: the cloud and camera topics of a params file (publishers, QoS, one message each) and the camera
transforms, each waited for at most ``wait_s`` seconds; joins the ROS graph in this environment's DDS settings."""
from __future__ import annotations

from typing import Any, Callable

from sal_ros.tools.doctor.report import DOCS, FAIL, MIB, OK, WARN, Check


def live_checks(values: dict[str, Any], wait_s: float) -> list[Check]:
    """Joins the graph with this environment's DDS settings: the cloud topic's publishers and their QoS against
    the node's subscription, one cloud, each camera's image and CameraInfo, and (calibration.source tf) the
    transform from the cloud's frame to each camera's."""
    import rclpy

    from sal_ros.nodes import params as P

    defaults = {s.name: s.default for s in P.all_specs(P.SEGMENTER_NODE, values)}
    values = {**defaults, **values}
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("sal_doctor", context=context)
    probe = _Live(node, context, wait_s)
    try:
        checks = [probe.cloud(values["cloud_topic"], values["qos.cloud.reliability"])]
        for name in values.get("cameras") or []:
            checks.append(probe.camera(name, values[f"camera.{name}.image_topic"], values[f"camera.{name}.info_topic"],
                                       bool(values[f"camera.{name}.compressed"])))
        if values.get("cameras") and values["calibration.source"] == "tf":
            checks += probe.transforms()
        return checks
    finally:
        probe.executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


class _Live:
    def __init__(self, node: Any, context: Any, wait_s: float) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.node, self.wait_s = node, wait_s
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(node)
        self.cloud_frame: str | None = None
        self.camera_frames: dict[str, str] = {}

    def _spin_until(self, done: Callable[[], Any]) -> Any:
        """``done()``'s value once truthy, spinning meanwhile; its last (falsy) value after ``wait_s``."""
        import time

        end = time.monotonic() + self.wait_s
        while not (value := done()) and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        return value

    def _one(self, msg_type: Any, topic: str, reliability: str = "best_effort") -> Any:
        from sal_ros.nodes.qos import profile

        got: list = []
        sub = self.node.create_subscription(msg_type, topic, got.append, profile(reliability, 1))
        try:
            self._spin_until(lambda: got)
        finally:
            self.node.destroy_subscription(sub)
        return got[0] if got else None

    def cloud(self, topic: str, reliability: str) -> Check:
        from rclpy.qos import ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        name = f"live cloud {topic}"
        infos = self._spin_until(lambda: self.node.get_publishers_info_by_topic(topic))
        if not infos:
            return Check(name, FAIL, f"no publisher within {self.wait_s:g} s",
                         "check the topic name (`ros2 topic list`), the driver, ROS_DOMAIN_ID and discovery range")
        best_effort = [i for i in infos if i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT]
        if reliability == "reliable" and best_effort:
            return Check(name, FAIL, f"{len(best_effort)} best-effort publisher(s), the node subscribes reliable: "
                         "they never match", "set qos.cloud.reliability: best_effort")
        msg = self._one(PointCloud2, topic)
        if msg is None:
            return Check(name, WARN, f"{len(infos)} publisher(s) but no cloud arrived within {self.wait_s:g} s",
                         f"large best-effort clouds are being lost: see the DDS checks above and {DOCS}")
        self.cloud_frame = msg.header.frame_id
        size = len(msg.data)
        qos = "best effort" if best_effort else "reliable"
        return Check(name, OK, f"{len(infos)} publisher(s), {qos}; a cloud of {msg.width * msg.height} points "
                     f"({size / MIB:.1f} MiB) in frame {msg.header.frame_id!r}")

    def camera(self, camera: str, image_topic: str, info_topic: str, compressed: bool) -> Check:
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        name = f"live camera {camera}"
        image = self._one(CompressedImage if compressed else Image, image_topic)
        if image is None:
            return Check(name, FAIL, f"no image on {image_topic} within {self.wait_s:g} s",
                         "check camera.<name>.image_topic / .compressed and the camera driver")
        info = self._one(CameraInfo, info_topic)
        self.camera_frames[camera] = image.header.frame_id
        if info is None:
            return Check(name, WARN, f"images in frame {image.header.frame_id!r}, but no CameraInfo on {info_topic}",
                         "the camera is left out of every frame without intrinsics: check camera.<name>.info_topic "
                         "(or give intrinsics in the static calibration file)")
        return Check(name, OK, f"images in frame {image.header.frame_id!r}, CameraInfo {info.width}x{info.height}")

    def transforms(self) -> list[Check]:
        try:
            import tf2_ros
        except ImportError:
            return [Check("live transforms", FAIL, "tf2_ros is not importable", "source your ROS 2 setup")]
        from rclpy.duration import Duration
        from rclpy.time import Time

        if self.cloud_frame is None:
            return [Check("live transforms", WARN, "no cloud arrived: the cloud's frame is unknown")]
        buffer = tf2_ros.Buffer()
        listener = tf2_ros.TransformListener(buffer, self.node, spin_thread=False)
        try:
            out = []
            for camera, frame in self.camera_frames.items():
                found = self._spin_until(lambda f=frame: buffer.can_transform(f, self.cloud_frame, Time(),
                                                                              Duration(seconds=0)))
                name = f"live transform {camera}"
                if found:
                    out.append(Check(name, OK, f"{self.cloud_frame!r} -> {frame!r} available"))
                else:
                    out.append(Check(name, FAIL, f"no transform {self.cloud_frame!r} -> {frame!r} within "
                                     f"{self.wait_s:g} s", "publish it (robot_state_publisher, a static transform "
                                     "publisher) or use calibration.source: static"))
            return out
        finally:
            listener.unregister()
