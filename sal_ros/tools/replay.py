"""``sal-ros replay BAG``: publish a rosbag2 (sqlite3 or mcap) through rclpy with /clock, like ``ros2 bag play``.

Messages go out as the bag's raw CDR bytes (no deserialization), at their recorded pace scaled by ``--rate``;
/clock carries the bag time so nodes with ``use_sim_time`` follow it. Publishers are reliable (they reach
reliable and best-effort subscribers); topics recorded transient-local (``/tf_static``) stay transient-local.
Topics whose message type is not installed for rclpy are skipped with a warning.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from sal_ros.data.bag import open_bag
from sal_ros.tools.run import spin_until_shutdown

CLOCK_PERIOD_S = 0.02  # /clock at 50 Hz while waiting between messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", type=Path, help="rosbag2 directory (or .mcap/.db3 file)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="start over at the end")
    parser.add_argument("--topics", nargs="+", default=None, help="only these topics (default: all)")
    parser.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    parser.add_argument("--wait-for-subscribers-s", type=float, default=3.0, metavar="S",
                        help="before playing, wait up to S seconds for a subscriber on one of the bag's topics "
                             "(the node being fed), so its first messages are not lost to DDS discovery; 0: no wait")
    parser.add_argument("--start-paused-s", type=float, default=0.5,
                        help="then wait this long so the other subscriptions match too (s)")


def message_class(msgtype: str) -> Any | None:
    """The rclpy class of a ROS type name (``sensor_msgs/msg/PointCloud2``), or None when not installed."""
    parts = msgtype.split("/")
    if len(parts) == 2:  # "pkg/Type" (ROS 1 style names in some bags)
        parts = [parts[0], "msg", parts[1]]
    pkg, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        return None


def _transient_local(connection: Any) -> bool:
    if connection.topic == "/tf_static":
        return True
    profiles = str(getattr(getattr(connection, "ext", None), "offered_qos_profiles", "") or "")
    return "transient_local" in profiles or "durability: 1" in profiles


class BagPlayer:
    """Publishes one bag's messages from ``node``; ``play()`` returns the number of messages published."""

    def __init__(self, node: Any, bag: Path, rate: float = 1.0, topics: Iterable[str] | None = None,
                 clock: bool = True) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        if rate <= 0:
            raise ValueError(f"--rate must be > 0, got {rate}")
        self.node, self.bag, self.rate = node, Path(bag), rate
        self._stop = threading.Event()
        with open_bag(self.bag) as reader:
            if not reader.is2:
                raise ValueError(f"{bag}: a ROS 1 bag; replay publishes rosbag2 CDR as is (convert it first)")
            wanted = set(topics) if topics else None
            self.connections = [c for c in reader.connections if wanted is None or c.topic in wanted]
            missing = sorted((wanted or set()) - {c.topic for c in reader.connections})
        if missing:
            node.get_logger().warning(f"topics not in {bag}: {missing}")
        self.publishers: dict[str, Any] = {}
        for conn in self.connections:
            cls = message_class(conn.msgtype)
            if cls is None:
                node.get_logger().warning(f"skipping {conn.topic}: type {conn.msgtype} is not installed for rclpy")
                continue
            if conn.topic in self.publishers:
                continue
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if _transient_local(conn)
                             else DurabilityPolicy.VOLATILE)
            self.publishers[conn.topic] = node.create_publisher(cls, conn.topic, qos)
        self._clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self._clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=1))

    def wait_for_subscribers(self, timeout_s: float) -> bool:
        """True as soon as one of the bag's topics has a subscriber; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(pub.get_subscription_count() > 0 for pub in self.publishers.values()):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()

    def _publish_clock(self, bag_ns: int) -> None:
        if self._clock_pub is None:
            return
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        sec, nanosec = divmod(int(bag_ns), 1_000_000_000)
        self._clock_pub.publish(Clock(clock=Time(sec=sec, nanosec=nanosec)))

    def _wait_until(self, wall_target: float, bag_start_ns: int, wall_start: float) -> None:
        """Sleep until ``wall_target`` (monotonic s), ticking /clock with the bag time it stands for."""
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= wall_target:
                return
            self._publish_clock(bag_start_ns + int((now - wall_start) * self.rate * 1e9))
            time.sleep(min(CLOCK_PERIOD_S, wall_target - now))

    def play(self) -> int:
        """Publish the bag once at its recorded pace / rate; stops early on ``stop()``."""
        count = 0
        conns = [c for c in self.connections if c.topic in self.publishers]
        if not conns:
            return 0
        with open_bag(self.bag) as reader:
            wall_start, bag_start = time.monotonic(), None
            for conn, bag_ns, raw in reader.messages(connections=[c for c in reader.connections
                                                                   if c.topic in self.publishers]):
                if self._stop.is_set():
                    break
                if bag_start is None:
                    bag_start = bag_ns
                self._wait_until(wall_start + (bag_ns - bag_start) / 1e9 / self.rate, bag_start, wall_start)
                self._publish_clock(bag_ns)
                self.publishers[conn.topic].publish(bytes(raw))
                count += 1
        return count


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Exit code 0 when the bag was played (or Ctrl-C stopped it), 1 when it could not be, 2 without the bag.

    Shutdown is ordered: stop playing, stop the executor and join its thread, destroy the node, shut rclpy down.
    A spin thread still inside rclpy's C++ wait when the interpreter exits aborts the process ("terminate called
    without an active exception", exit code 134). rclpy's own signal handlers are off: SIGINT (Ctrl-C) and SIGTERM
    raise KeyboardInterrupt in the main thread instead of shutting the context down under the publishing loop.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    if not args.bag.exists():
        print(f"sal-ros replay: {args.bag} does not exist", file=sys.stderr)
        return 1
    signals = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt) for sig in signals} if main_thread else {}
    node = executor = spinner = player = None
    rc = 0
    try:
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        node = rclpy.create_node("sal_replay")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=spin_until_shutdown, args=(executor,), name="sal_replay_spin",
                                   daemon=True)
        spinner.start()  # serves the node's parameter services
        player = BagPlayer(node, args.bag, args.rate, args.topics, clock=not args.no_clock)
        node.get_logger().info(f"replaying {args.bag}: {sorted(player.publishers)} at rate {args.rate}"
                               f"{' (loop)' if args.loop else ''}")
        if args.wait_for_subscribers_s > 0 and not player.wait_for_subscribers(args.wait_for_subscribers_s):
            node.get_logger().warning(f"no subscriber on {sorted(player.publishers)} after "
                                      f"{args.wait_for_subscribers_s:g} s; playing anyway")
        time.sleep(args.start_paused_s)
        while True:
            n = player.play()
            node.get_logger().info(f"published {n} messages")
            if not args.loop or n == 0:
                break
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - a bad bag ends the command with the reason
        print(f"sal-ros replay: replay failed: {exc}", file=sys.stderr)
        rc = 1
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        if player is not None:
            player.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if spinner is not None:
            spinner.join(timeout=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc
