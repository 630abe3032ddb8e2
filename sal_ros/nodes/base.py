"""The skeleton both sensor nodes share: declared inputs, counters, one worker thread, ~/stats and /diagnostics.

A subclass declares its own parameters, says what ``configure`` loads and starts (its worker, through
:meth:`SensorNode.start_worker`) and ``activate`` subscribes (:meth:`SensorNode.start_inputs`), and what its stats
record and diagnostics hold. A plain node does both at construction (:meth:`SensorNode.bring_up`); the managed
variant (:func:`managed`) on its lifecycle transitions. Callbacks only hand synced frames to the worker's
latest-only slot.
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
from sal_ros.core.errors import SensorDataError
from sal_ros.nodes.stats import NodeStats, Throttle, throttled
from sal_ros.nodes.worker import Worker


class SensorNode(Node):
    """A node fed by synced lidar + camera frames, worked on by one :class:`Worker`."""

    #: what the error log names when the worker fails on a frame
    WORK = "frame"
    #: a lifecycle node (:func:`managed`) waits for configure and activate; a plain one does both at start
    MANAGED = False
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

    def bring_up(self) -> None:
        """A plain node configures and activates itself at construction; a managed one waits for its transitions."""
        if not self.MANAGED:
            self.configure()
            self.activate()

    def configure(self) -> None:
        """Load what processing needs and start the worker (the lifecycle's configure)."""
        raise NotImplementedError

    def activate(self) -> None:
        """Take input (the lifecycle's activate)."""
        raise NotImplementedError

    def deactivate(self) -> None:
        """Stop taking input; what was configured and learned stays (the lifecycle's deactivate)."""
        self.stop_inputs()
        self.get_logger().info("paused: no input taken until activate")

    def cleanup(self) -> None:
        """Undo :meth:`configure` (the lifecycle's cleanup)."""
        self.stop_worker()

    @property
    def configured(self) -> bool:
        return hasattr(self, "worker")

    @property
    def taking_input(self) -> bool:
        return hasattr(self, "inputs")

    def start_worker(self, worker: Worker) -> None:
        """Start ``worker`` and wait for its setup (e.g. the model loading on its thread)."""
        self.worker = worker.start()

    def start_inputs(self) -> None:
        """Subscribe to the inputs and start the ~/stats and /diagnostics timers."""
        self.inputs = SensorInputs(self, self.values, self.cameras, self._on_synced, self.stats, Throttle())
        self._stats_timer = self.create_timer(self.values["stats_period"], self._publish_stats,
                                              callback_group=self.inputs.timer_group)
        self._diagnostics_timer = self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics,
                                                    callback_group=self.inputs.timer_group, clock=D.steady_clock())

    def stop_inputs(self) -> None:
        """Undo :meth:`start_inputs`: no input, no timer; the worker finishes the frame it holds."""
        self.inputs.close()
        self.destroy_timer(self._stats_timer)
        self.destroy_timer(self._diagnostics_timer)
        del self.inputs

    def stop_worker(self) -> None:
        """Stop the worker (the frame in hand is waited for up to its timeout) and forget it."""
        self.worker.stop()
        del self.worker

    def decode(self, synced: Any, with_cameras: bool) -> Any:
        """The synced messages decoded (sal_ros.nodes.inputs), what was left out reported; None for a malformed
        cloud, which is counted, reported in /diagnostics and warned about (throttled), and the node goes on."""
        try:
            decoded = self.inputs.decode(synced, with_cameras=with_cameras)
        except SensorDataError as exc:
            self.stats.count("error.malformed_cloud")
            self.health.error("malformed_cloud")
            self.get_logger().warning(f"dropped a malformed cloud: {exc}", **throttled())
            return None
        self.health.left_out(list(decoded.problems))
        return decoded

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


class Managed:
    """The lifecycle (managed) variant of a :class:`SensorNode` subclass (:func:`managed`). Constructed
    unconfigured, with its parameters declared (``ros2 param`` works), and driven by ``ros2 lifecycle set`` or
    the ``~/change_state`` service: configure = the node's ``configure()`` (segmenter: model and vocabulary
    loaded), activate = ``activate()`` (subscriptions and timers), deactivate = ``deactivate()`` (paused; model,
    vocabulary, tracks and counters kept), cleanup = ``cleanup()`` (worker stopped, model freed), shutdown = what
    is up taken down. A step that fails is logged with its reason and the transition fails."""

    MANAGED = True

    def __init__(self, **node_kwargs: Any) -> None:
        from rclpy.lifecycle import LifecycleNodeMixin

        super().__init__(**node_kwargs)
        LifecycleNodeMixin.__init__(self)
        self.get_logger().info("managed node: unconfigured; `ros2 lifecycle set <node> configure`, then activate")

    def on_configure(self, state: Any) -> Any:
        return self._transition("configure", self.configure, undo=self.cleanup)

    def on_activate(self, state: Any) -> Any:
        return self._transition("activate", self.activate, undo=self.deactivate)

    def on_deactivate(self, state: Any) -> Any:
        return self._transition("deactivate", self.deactivate)

    def on_cleanup(self, state: Any) -> Any:
        return self._transition("cleanup", self.cleanup)

    def on_shutdown(self, state: Any) -> Any:
        return self._transition("shutdown", self._take_down)

    def on_error(self, state: Any) -> Any:
        return self._transition("error recovery", self._take_down)

    def destroy_node(self) -> None:
        super().destroy_node()
        machine = getattr(self, "_state_machine", None)
        if machine is not None:  # rclpy never frees it, and it holds the node handle: the node stayed in the
            machine.destroy_when_not_in_use()  # ROS graph until the process ended (a namesake to every later node)

    def _take_down(self) -> None:
        if self.taking_input:
            self.deactivate()
        if self.configured:
            self.cleanup()

    def _transition(self, name: str, step: Any, undo: Any = None) -> Any:
        from rclpy.lifecycle import TransitionCallbackReturn

        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the transition fails with the reason; the node keeps running
            self.get_logger().error(f"{name} failed: {type(exc).__name__}: {exc}")
            if undo is not None:
                try:
                    undo()
                except Exception as again:  # noqa: BLE001 - the first reason is the one that matters
                    self.get_logger().error(f"undoing {name}: {type(again).__name__}: {again}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"lifecycle: {name} done")
        return TransitionCallbackReturn.SUCCESS


def managed(node_class: type) -> type:
    """``node_class`` as a lifecycle node: :class:`Managed` first, rclpy's LifecycleNodeMixin (services, state
    machine) after the node's own classes."""
    from rclpy.lifecycle import LifecycleNodeMixin

    return type(f"Managed{node_class.__name__}", (Managed, node_class, LifecycleNodeMixin), {})
