"""Sensor inputs shared by the segmenter and the recorder: subscriptions, lidar-anchored sync, camera infos,
extrinsics, and turning a synced set of messages into a :class:`~sal_ros.core.types.Frame`.

Subscription callbacks only store messages (into the synchronizer, under a lock) and hand completed sets to
the node's ``on_synced`` (a latest-only slot); all decoding happens later, on the node's worker thread.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sal_ros.core.errors import CalibrationError, SensorDataError
from sal_ros.core.frame_builder import FrameBuilder
from sal_ros.core.msgtypes import NS_PER_S, stamp_to_ns
from sal_ros.core.types import CameraView, Frame
from sal_ros.nodes import params as P
from sal_ros.nodes.qos import input_profile
from sal_ros.nodes.stats import NodeStats, Throttle, cloud_ledger


@dataclass
class CameraConfig:
    name: str
    image_topic: str
    info_topic: str
    compressed: bool
    time_offset_ns: int
    rectified: bool = False


@dataclass
class DecodedFrame:
    """A Frame plus the messages it came from (the recorder keeps camera infos) and what went missing."""

    frame: Frame
    cloud_msg: Any
    infos: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # camera -> why it was left out


def declare_inputs(node: Any) -> tuple[dict[str, Any], list[CameraConfig]]:
    """Declare the shared input parameters and the ``camera.<name>.*`` group of each configured camera."""
    values = P.declare(node, P.INPUT_PARAMS)
    cameras = []
    if len(set(values["cameras"])) != len(values["cameras"]):
        raise ValueError(f"cameras: duplicate names in {values['cameras']}")
    for name in values["cameras"]:
        cam = P.declare(node, P.camera_specs(name))
        values.update(cam)
        prefix = f"camera.{name}."
        cameras.append(CameraConfig(
            name=name,
            image_topic=cam[prefix + "image_topic"],
            info_topic=cam[prefix + "info_topic"],
            compressed=cam[prefix + "compressed"],
            time_offset_ns=int(round(cam[prefix + "time_offset"] * NS_PER_S)),
            rectified=cam[prefix + "rectified"],
        ))
    return values, cameras


def make_extrinsics(node: Any, values: dict[str, Any]) -> Any:
    """The extrinsics source named by ``calibration.source``: a tf2 buffer (a transform published after the cloud
    is waited for up to ``sync.timeout`` past the cloud stamp, on the worker thread) or a static YAML file."""
    from sal_ros.nodes.extrinsics import make_extrinsics_source

    if values["calibration.source"] == "static" and not values["calibration.file"]:
        raise CalibrationError("calibration.source is 'static' but calibration.file is empty")
    return make_extrinsics_source(values["calibration.source"], node=node, path=values["calibration.file"] or None,
                                  wait_s=values["sync.timeout"])


class SensorInputs:
    """Subscribes to the cloud, images and camera infos; emits synced sets to ``on_synced`` (callback threads)."""

    def __init__(
        self,
        node: Any,
        values: dict[str, Any],
        cameras: list[CameraConfig],
        on_synced: Callable[[Any], None],
        stats: NodeStats,
        throttle: Throttle,
    ) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
        from rclpy.event_handler import SubscriptionEventCallbacks
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

        from sal_ros.core.sync import LidarAnchoredSynchronizer

        self.node = node
        self.cameras = {c.name: c for c in cameras}
        self._on_synced = on_synced
        self._stats = stats
        self._throttle = throttle
        self._log = node.get_logger()
        self._lock = threading.Lock()
        self._sync = LidarAnchoredSynchronizer(
            cameras=[c.name for c in cameras],
            offsets_ns={c.name: c.time_offset_ns for c in cameras},
            match_threshold_ns=int(round(values["sync.match_threshold"] * NS_PER_S)),
            timeout_ns=int(round(values["sync.timeout"] * NS_PER_S)),
        )
        self._allow_partial = values["sync.allow_partial"]
        self._wall_received: dict[int, int] = {}  # cloud stamp -> monotonic ns it arrived (latency is wall time)
        self._infos: dict[str, Any] = {}
        self._last_seen: dict[str, float] = {}
        self._input_timeout = values["input_timeout"]
        self._started = time.monotonic()
        self._extrinsics = None
        self._extrinsics_error = ""
        try:
            self._extrinsics = make_extrinsics(node, values) if cameras else None
        except (ImportError, SensorDataError, OSError) as exc:
            # No calibration: lidar-only outputs go on; overlays and recorded camera views are left out.
            self._extrinsics_error = str(exc)
            self._log.error(f"calibration unavailable, camera views will be left out: {exc}")
        self._builder = FrameBuilder(self.cameras, self._extrinsics, self._extrinsics_error, self._infos)
        self._tf_wait_s = values["sync.timeout"]
        self._tf: Any = None

        group = ReentrantCallbackGroup()  # callbacks only store; they may run concurrently
        # Fast DDS reports clouds it lost in transport (a fragment missing, a gap in a writer's samples) through the
        # message-lost event; the writer's sequence numbers in each message's info show every gap, those lost in
        # the reader's queue too. Clouds one at a time, in arrival order: in the reentrant group a newer cloud
        # overtook an older one under load, and the older was then refused as late.
        self.subscriptions = [node.create_subscription(
            PointCloud2, values["cloud_topic"], self._on_cloud, input_profile(values, "cloud"),
            callback_group=MutuallyExclusiveCallbackGroup(),
            event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_cloud_lost))]
        for cam in cameras:
            image_type = CompressedImage if cam.compressed else Image
            self.subscriptions.append(node.create_subscription(
                image_type, cam.image_topic, self._image_callback(cam.name), input_profile(values, "images"),
                callback_group=group))
            self.subscriptions.append(node.create_subscription(
                CameraInfo, cam.info_topic, self._info_callback(cam.name), input_profile(values, "camera_info"),
                callback_group=group))
        self.timer_group = timers = MutuallyExclusiveCallbackGroup()
        # Timeouts fire even when no new message arrives (the last cloud of a burst still goes out).
        poll_period = max(0.005, min(0.05, values["sync.timeout"] / 4 or 0.005))
        self._poll_timer = node.create_timer(poll_period, self._drain, callback_group=timers)
        # The watchdog runs on the steady clock: on a ROS-clock timer with use_sim_time it stood still until the
        # replay's /clock started and then warned of the whole wait at the moment the first cloud arrived.
        from rclpy.clock import Clock, ClockType

        self._watch_timer = node.create_timer(1.0, self._watch_inputs, callback_group=timers,
                                              clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._jump_handle = self._on_clock_jumps(node)
        # As resolved (namespace, remapping: `-r /points:=/velodyne_points`): what logs and diagnostics name.
        self.topics = {"cloud": self.subscriptions[0].topic_name,
                       **{c.name: sub.topic_name for c, sub in zip(cameras, self.subscriptions[1::2])}}

    def close(self) -> None:
        """Stop taking input (a managed node's deactivate): subscriptions, timers, the clock-jump callback and a tf2
        listener of its own are removed from the node; nothing is decoded after this."""
        node = self.node
        for sub in self.subscriptions:
            node.destroy_subscription(sub)
        self.subscriptions = []
        self._stats.publishers.resync()
        with self._lock:  # clouds waiting for their cameras go with the synchronizer
            self._stats.count("clouds.dropped.deactivated", self._sync.pending)
        for timer in (self._poll_timer, self._watch_timer):
            node.destroy_timer(timer)
        self._jump_handle.unregister()
        for source in (self._extrinsics, self._tf):
            listener = getattr(source, "listener", None)
            if listener is not None:
                listener.unregister()

    def tf_buffer(self) -> Any:
        """The node's one tf2 buffer (nodes.extrinsics.Tf2Extrinsics: T_target_source at a stamp, waiting up to sync.timeout
        past it; call lookups on the worker thread): the camera extrinsics' own when calibration.source is tf,
        else one made on the first call (make it in the node's constructor, before the node spins). Raises
        Tf2Unavailable without tf2_ros."""
        from sal_ros.nodes.extrinsics import Tf2Extrinsics, make_extrinsics_source

        if isinstance(self._extrinsics, Tf2Extrinsics):
            return self._extrinsics
        if self._tf is None:
            self._tf = make_extrinsics_source("tf", node=self.node, wait_s=self._tf_wait_s)
        return self._tf

    # ---------------------------------------------------------------------------------- callbacks (store only)

    def _on_cloud(self, msg: Any, info: Any) -> None:  # two arguments: rclpy passes the MessageInfo
        self._last_seen["cloud"] = time.monotonic()
        self._stats.count("clouds.delivered")
        self._count_gap(info)
        stamp = stamp_to_ns(msg.header.stamp)
        if stamp <= 0:
            kind = "zero" if stamp == 0 else "negative"
            self._stats.count(f"error.{kind}_stamp")
            self._warn(f"{kind}_stamp", f"cloud with a {kind} stamp ({msg.header.stamp.sec} s, "
                       f"{msg.header.stamp.nanosec} ns) dropped (driver not setting header.stamp?); camera "
                       "matching and TF lookups need real stamps")
        with self._lock:
            self._remember_arrival(stamp)
            before = self._sync.stats.clouds, self._sync.stats.dropped_cloud_overflow, self._sync.stats.dropped_time_jump
            ready = self._sync.add_cloud(stamp, msg, self._ros_now_ns())
            accepted = self._sync.stats.clouds > before[0]
            self._stats.count("clouds.dropped.sync_overflow", self._sync.stats.dropped_cloud_overflow - before[1])
            self._stats.count("clouds.dropped.time_jump", self._sync.stats.dropped_time_jump - before[2])
        late = not accepted and stamp > 0
        self._stats.count("clouds.seen" if accepted else "clouds.refused." + ("late" if late else "stamp"))
        if late:
            self._stats.count("error.late_cloud")
            self._warn("late_cloud", f"cloud stamped {stamp} ns dropped: not newer than a cloud already "
                       "processed (a replay restarted without use_sim_time, or a driver repeating stamps?)")
        self._drain(ready)

    def _count_gap(self, info: Any) -> None:
        lost, before_first = self._stats.publishers.gap(info)
        if before_first:
            self._stats.count("clouds.before_first", before_first)
        if lost:
            self._stats.count("clouds.lost.sequence_gap", lost)
            self._warn("lost", f"{lost} cloud(s) on {self.topics['cloud']} sent by the publisher never reached the "
                       "node (lost in transport or overwritten in the subscription queue); `sal-ros doctor` "
                       "checks the DDS settings that lose large clouds")

    def _on_cloud_lost(self, info: Any) -> None:
        self._stats.count("clouds.lost.dds_event", info.total_count_change)

    def cloud_ledger(self, in_worker: int = 0) -> dict[str, Any]:
        """Every cloud accounted for (stats.cloud_ledger); ``in_worker``: clouds in the node's slot or worker."""
        with self._lock:
            pending = self._sync.pending
        return cloud_ledger(self._stats.snapshot()["counts"], pending + in_worker)

    def _on_clock_jumps(self, node: Any) -> Any:
        """Reset the synchronizer when ROS time jumps backwards (a bag replayed again into a use_sim_time node):
        its clouds would otherwise all be taken as late, silently."""
        from rclpy.clock import JumpThreshold
        from rclpy.duration import Duration

        def on_jump(jump: Any) -> None:
            if jump.delta.nanoseconds >= 0:
                return
            with self._lock:
                self._stats.count("clouds.dropped.time_jump", self._sync.pending)
                self._sync.reset()
                self._wall_received.clear()
            self._stats.count("time_jump_back")
            self._log.warning(f"ROS time jumped back {-jump.delta.nanoseconds / NS_PER_S:.3f} s (a replay restarted?): "
                              "synchronizer reset, the new clouds are processed")

        threshold = JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1), on_clock_change=False)
        return node.get_clock().create_jump_callback(threshold, post_callback=on_jump)

    def _image_callback(self, name: str) -> Callable[[Any], None]:
        def on_image(msg: Any) -> None:
            self._last_seen[name] = time.monotonic()
            with self._lock:
                ready = self._sync.add_camera(name, stamp_to_ns(msg.header.stamp), msg)
            self._drain(ready)

        return on_image

    def _info_callback(self, name: str) -> Callable[[Any], None]:
        def on_info(msg: Any) -> None:
            self._infos[name] = msg  # a reference swap is atomic; the worker reads the latest

        return on_info

    def _drain(self, ready: list | None = None) -> None:
        """Hand over the sets the synchronizer has decided (``ready`` from add_*, plus timeouts)."""
        with self._lock:
            ready = (ready or []) + self._sync.poll(self._ros_now_ns())
            ready = [replace(one, received_ns=self._wall_received.pop(one.stamp_ns, None)) for one in ready]
        for synced in ready:
            if synced.missing:
                self._stats.count("partial")
                self._warn("missing:" + ",".join(synced.missing),
                           f"no image matched the cloud for camera(s) {list(synced.missing)} within the sync "
                           "threshold/timeout (check time_offset, stamps and camera rates)")
                if not self._allow_partial:
                    self._stats.count("dropped_partial")
                    continue
            else:
                self._stats.count("matched")
            self._on_synced(synced)

    def _ros_now_ns(self) -> int | None:
        """The clock of the sync timeout: ROS time, so a late camera is waited for in the bag's time during a
        slowed replay (use_sim_time) as it would be live; None before sim time has started (stamps decide)."""
        return self.node.get_clock().now().nanoseconds or None

    def _remember_arrival(self, stamp: int) -> None:
        """Wall arrival per pending cloud; bounded, since the synchronizer may discard clouds without emitting."""
        if len(self._wall_received) >= 4 * self._sync.buffer_size:
            self._wall_received.pop(next(iter(self._wall_received)))
        self._wall_received.setdefault(stamp, time.monotonic_ns())

    def _watch_inputs(self) -> None:
        now = time.monotonic()
        for key, topic in self.topics.items():
            last = self._last_seen.get(key, self._started)
            if now - last > self._input_timeout:
                verb = "has been silent" if key in self._last_seen else "has published nothing"
                self._warn(f"silent:{key}", f"input {topic} {verb} for {now - last:.1f} s "
                           "(topic name, QoS reliability, DDS discovery?)")

    def _warn(self, key: str, text: str) -> None:
        if self._throttle.ready(key):
            self._log.warning(text)

    # -------------------------------------------------------------------------------- decoding (worker thread)

    def sync_stats(self) -> dict[str, Any]:
        with self._lock:
            return self._sync.stats.as_dict()

    def decode_cloud(self, msg: Any) -> Frame:
        """Cloud message -> Frame without cameras (MalformedMessageError on a bad cloud)."""
        from sal_ros.core.pointcloud2 import intensity_problem, read_xyz_intensity

        xyz, intensity = read_xyz_intensity(msg)
        if intensity is None:
            problem = intensity_problem(msg)
            if problem:
                self._stats.count("warning.intensity_ignored")
                self._warn("intensity_ignored", problem)
        return Frame(stamp_ns=stamp_to_ns(msg.header.stamp), frame_id=str(msg.header.frame_id), points=xyz,
                     intensity=intensity, key=str(stamp_to_ns(msg.header.stamp)))

    def decode_camera(self, name: str, image_msg: Any, frame: Frame) -> tuple[CameraView | None, str]:
        """One synced image -> CameraView (core.frame_builder's rules), or None and the reason it was left out
        (counted and warned, throttled)."""
        view, reason, text = self._builder.camera_view(name, image_msg, frame)
        return (view, "") if view is not None else self._left_out(name, reason, text)

    def _left_out(self, name: str, reason: str, text: str) -> tuple[None, str]:
        self._stats.count(f"error.{reason}")
        self._warn(f"{reason}:{name}", f"{text}; camera left out")
        return None, reason

    def decode(self, synced: Any, with_cameras: bool = True) -> DecodedFrame:
        """A synced set -> DecodedFrame. Raises MalformedMessageError only for a bad cloud; a bad camera is
        left out of the frame (``problems``) and the frame goes on."""
        frame = self.decode_cloud(synced.cloud)
        out = DecodedFrame(frame=frame, cloud_msg=synced.cloud)
        missing = list(synced.missing)
        if with_cameras:
            for name, (_, image_msg) in synced.images.items():
                view, reason = self.decode_camera(name, image_msg, frame)
                if view is None:
                    out.problems[name] = reason
                    missing.append(name)
                    continue
                frame.cameras[name] = view
                out.infos[name] = self._infos.get(name)
        frame.missing_cameras = tuple(missing)
        return out
