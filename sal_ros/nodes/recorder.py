"""``sal_recorder``: synced lidar + camera frames into a FrameStore directory for the pseudo-label engine.

Each recorded frame holds the cloud (xyz, intensity), every synced camera's image, camera model (from its
CameraInfo) and lidar->camera transform at the cloud stamp, and the stamps. Frames are appended atomically by
the FrameStore, so a ``kill -9`` loses at most the frame being written, never a completed one; restarting on the
same ``output_dir`` resumes the store. ``every_nth``, ``max_frames`` and ``max_gb`` bound what is kept.

Same threading as the segmenter: callbacks store, a latest-only slot feeds one writer thread.
"""
from __future__ import annotations

import time
from typing import Any

from rclpy.node import Node

from sal_ros.core.errors import SensorDataError
from sal_ros.nodes import diagnostics as D
from sal_ros.nodes import params as P
from sal_ros.nodes.inputs import SensorInputs, declare_inputs
from sal_ros.nodes.qos import profile
from sal_ros.nodes.stats import NodeStats, Throttle
from sal_ros.nodes.worker import Worker


class RecorderNode(Node):
    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(P.RECORDER_NODE, **node_kwargs)
        self.stats = NodeStats()
        self.throttle = Throttle()
        self.values, cameras = declare_inputs(self)
        self.values.update(P.declare(self, P.RECORDER_PARAMS))
        self.store = self._open_store()
        self._full = False
        self._stopped = ""  # why recording stopped: "limit" or the error
        self.health = D.HealthMonitor([c.name for c in cameras])
        self.worker = Worker("sal_recorder_writer", self._record, self._on_worker_error).start()
        self.inputs = SensorInputs(self, self.values, cameras, self._on_synced, self.stats, self.throttle)
        from std_msgs.msg import String

        self._String = String
        self._pub_stats = self.create_publisher(String, "~/stats", profile("reliable", 5))
        self._stats_timer = self.create_timer(self.values["stats_period"], self._publish_stats,
                                              callback_group=self.inputs.timer_group)
        from diagnostic_msgs.msg import DiagnosticArray

        self._pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", profile("reliable", 10))
        self._diagnostics_timer = self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics,
                                                    callback_group=self.inputs.timer_group, clock=D.steady_clock())
        if not cameras:
            self.get_logger().warning("no cameras configured: frames are recorded lidar-only; "
                                      "pseudo-labels need camera images")
        self.get_logger().info(f"recording {self.values['cloud_topic']} + cameras {[c.name for c in cameras]} "
                               f"into {self.values['output_dir']} ({len(self.store)} frames there already)")

    def _open_store(self) -> Any:
        from sal_ros.data.framestore import FrameStore

        v = self.values
        return FrameStore(
            v["output_dir"],
            every_nth=v["every_nth"],
            max_frames=v["max_frames"] or None,
            max_bytes=int(v["max_gb"] * 1e9) or None,
        )

    def _on_synced(self, synced: Any) -> None:
        self.health.frame_in(synced.missing)
        if self.worker.submit(synced):
            self.stats.count("dropped")
            self.health.dropped()

    def _on_worker_error(self, exc: BaseException) -> None:
        self.stats.count("error.unexpected")
        self.health.error("unexpected")
        self.get_logger().error(f"recording a frame failed: {type(exc).__name__}: {exc}")

    def _record(self, synced: Any) -> None:
        if self._full:
            self.stats.count("skipped_store_full")
            return
        t0 = time.perf_counter()
        try:
            decoded = self.inputs.decode(synced, with_cameras=True)
        except SensorDataError as exc:
            self.stats.count("error.malformed_cloud")
            self.health.error("malformed_cloud")
            if self.throttle.ready("malformed"):
                self.get_logger().warning(f"dropped a malformed cloud: {exc}")
            return
        self.health.left_out(list(decoded.problems))
        try:
            written = self.store.append(decoded.frame)
        except RuntimeError as exc:  # another process holds the store
            self._full = True
            self._stopped = str(exc)
            self.get_logger().error(f"recording stops: {exc}")
            return
        if written is None:
            self.stats.count("skipped_every_nth")
            return
        if written is False:  # a size or frame limit is reached
            self._full = True
            self._stopped = "limit"
            self.get_logger().warning(f"{self.values['output_dir']}: limit reached "
                                      f"(max_frames={self.values['max_frames']}, max_gb={self.values['max_gb']}); "
                                      "recording stops")
            return
        self.stats.count("recorded")
        self.stats.time("write", (time.perf_counter() - t0) * 1e3)
        self.health.processed()

    def _publish_stats(self) -> None:
        extra = {"frames_in_store": len(self.store), "sync": self.inputs.sync_stats()}
        self._pub_stats.publish(self._String(data=self.stats.to_json(**extra)))
        if self.stats.get("matched") or self.stats.get("partial"):
            self.get_logger().info(self.stats.summary_line(("recorded", "matched", "partial", "dropped")))

    def _publish_diagnostics(self) -> None:
        window, v, name = self.health.window(), self.values, self.get_name()
        statuses = [D.input_status(name, window, v["cloud_topic"], v["input_timeout"]),
                    D.recording_status(name, window, v["output_dir"], len(self.store), self._stopped,
                                       self.stats.snapshot()["timings"])]
        self._pub_diagnostics.publish(D.diagnostic_array(statuses, self.get_clock().now().to_msg(),
                                                         self.get_fully_qualified_name()))

    def destroy_node(self) -> None:
        # Also called by rclpy at shutdown on a node whose __init__ failed part-way.
        if hasattr(self, "worker"):
            self.worker.stop()
        if hasattr(self, "store"):
            self.store.close()
        super().destroy_node()
