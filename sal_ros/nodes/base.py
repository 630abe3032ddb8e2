"""The skeleton both sensor nodes share: declared inputs, counters, one worker thread, ~/stats and /diagnostics.

A subclass declares its own parameters, starts its worker with :meth:`SensorNode.start`, and says what its
stats record and diagnostics hold. Callbacks only hand synced frames to the worker's latest-only slot.
"""
from __future__ import annotations

from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from std_msgs.msg import String

from sal_ros.nodes import diagnostics as D
from sal_ros.nodes import params as P
from sal_ros.nodes.inputs import SensorInputs, declare_inputs
from sal_ros.nodes.qos import profile
from sal_ros.nodes.stats import NodeStats, Throttle
from sal_ros.nodes.worker import Worker


class SensorNode(Node):
    """A node fed by synced lidar + camera frames, worked on by one :class:`Worker`."""

    #: what the error log names when the worker fails on a frame
    WORK = "frame"
    #: the counters of the periodic log line, which appears once any of ``SUMMARY_WHEN`` is non-zero
    SUMMARY: tuple[str, ...] = ("processed", "matched", "partial", "dropped")
    SUMMARY_WHEN: tuple[str, ...] = ("processed", "matched")

    def __init__(self, name: str, params: list, **node_kwargs: Any) -> None:
        super().__init__(name, **node_kwargs)
        self.stats = NodeStats()
        self.values, self.cameras = declare_inputs(self)
        self.values.update(P.declare(self, params))
        self.health = D.HealthMonitor([c.name for c in self.cameras])
        self._clouds_status = D.CloudLoss(name)
        self._pub_stats = self.create_publisher(String, "~/stats", profile("reliable", 5))
        self._pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", profile("reliable", 10))

    def start(self, worker: Worker) -> None:
        """Start ``worker`` (its setup first), then subscribe and start the ~/stats and /diagnostics timers."""
        self.worker = worker.start()
        self.inputs = SensorInputs(self, self.values, self.cameras, self._on_synced, self.stats, Throttle())
        self._stats_timer = self.create_timer(self.values["stats_period"], self._publish_stats,
                                              callback_group=self.inputs.timer_group)
        self._diagnostics_timer = self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics,
                                                    callback_group=self.inputs.timer_group, clock=D.steady_clock())

    def _on_synced(self, synced: Any) -> None:
        self.health.frame_in(synced.missing)
        if self.worker.submit(synced):
            self.stats.count("dropped")
            self.health.dropped()

    def _on_worker_error(self, exc: BaseException) -> None:
        self.stats.count("error.unexpected")
        self.health.error("unexpected")
        self.get_logger().error(f"{self.WORK} failed: {type(exc).__name__}: {exc}")

    def stats_extra(self) -> dict[str, Any]:
        """Node-specific entries of the ~/stats record besides counters, timings and sync."""
        return {}

    def diagnostic_statuses(self, window: Any) -> list:
        """The node's /diagnostics statuses over the health ``window``."""
        raise NotImplementedError

    def _publish_stats(self) -> None:
        record = self.stats.to_json(**self.stats_extra(), sync=self.inputs.sync_stats(),
                                    clouds=self.inputs.cloud_ledger(self.worker.in_hand()))
        self._pub_stats.publish(String(data=record))
        if any(self.stats.get(k) for k in self.SUMMARY_WHEN):
            self.get_logger().info(self.stats.summary_line(self.SUMMARY))

    def _publish_diagnostics(self) -> None:
        statuses = self.diagnostic_statuses(self.health.window())
        statuses.append(self._clouds_status.update(self.inputs.cloud_ledger(self.worker.in_hand())))
        self._pub_diagnostics.publish(D.diagnostic_array(statuses, self.get_clock().now().to_msg(),
                                                         self.get_fully_qualified_name()))

    def destroy_node(self) -> None:
        # Also called by rclpy at shutdown on a node whose __init__ failed part-way.
        if hasattr(self, "worker"):
            self.worker.stop()
        super().destroy_node()
