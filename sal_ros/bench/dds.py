"""``sal-ros bench dds``: lidar-sized PointCloud2 across two processes, shipped Fast DDS profile vs stock.

A publisher process sends ``--count`` clouds of ``--points`` points (x y z intensity ring t, as a Velodyne driver
does) at ``--rate`` Hz with the sensor-data QoS (best effort, keep last 5); a subscriber counts what arrives intact
and the latency (publisher wall clock at ``publish()`` -> subscriber callback, same machine). The subscriber of the
shipped profile runs in this process; with ``--compare-stock`` the same exchange runs again with Fast DDS's stock
configuration (no XML profile; both ends in fresh processes, since Fast DDS reads its profile once per process).

Discovery stays on localhost (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) in a private domain (``--domain-id``,
else a free one claimed for the run; the stock run uses another). Prints JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sal_ros.core.msgtypes import rosbags_types
from sal_ros.env import claim_free_ros_domain, fastdds_profile_path

PROFILE_ENV = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
TOPIC = "/sal_bench/points"
SEED = 7
LINGER_S = 60.0  # longest a publisher outlives its last sample, waiting for the subscriber to finish


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=100, help="clouds to send (default 100)")
    parser.add_argument("--rate", type=float, default=10.0, help="publish rate in Hz (default 10)")
    parser.add_argument("--points", type=int, default=120_000, help="points per cloud (default 120000)")
    parser.add_argument("--profile", type=Path, default=fastdds_profile_path(),
                        help="Fast DDS XML profile to measure (default: the shipped config/fastdds.xml)")
    parser.add_argument("--compare-stock", action="store_true",
                        help="also measure Fast DDS's stock configuration, side by side")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID for the run (default: a free one, claimed like the tests do; the stock "
                             "run claims another)")
    parser.add_argument("--discovery-timeout", type=float, default=15.0,
                        help="seconds the publisher waits for the subscriber to match (default 15)")
    # internal: the role of a child process
    parser.add_argument("--role", choices=("bench", "publish", "subscribe"), default="bench",
                        help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.role == "publish":
        return _print_json(publish(args), indent=None)
    if args.role == "subscribe":
        return _print_json(subscribe(args, _spawn(args, "publish", args.profile, args.domain_id)), indent=None)
    if args.profile is None or not Path(args.profile).is_file():
        print(f"sal-ros bench dds: Fast DDS profile not found: {args.profile}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "bench": "dds",
        "points": args.points,
        "bytes_per_cloud": len(make_cloud(args.points, rosbags_types()).data),
        "fields": "x y z intensity (float32) ring (uint16) t (float32)",
        "rate_hz": args.rate,
        "count": args.count,
        "qos": "sensor data: best_effort, keep_last 5, volatile",
        "discovery": "LOCALHOST",
    }
    # Free domains held for the whole run, so a test run or another bench on this machine never joins in.
    claims = [claim_free_ros_domain() for _ in range(1 + args.compare_stock)] if args.domain_id is None else []
    domains = [c.domain_id for c in claims] or [args.domain_id, args.domain_id + 1]
    result["domains"] = domains[: 1 + args.compare_stock]
    # This process hosts the profile's subscriber, so its environment must be set before rclpy loads.
    _set_env(os.environ, args.profile, domains[0])
    publisher = _spawn(args, "publish", args.profile, domains[0])
    result["profile"] = {"config": str(args.profile), **subscribe(args, publisher)}
    if args.compare_stock:
        subscriber = _spawn(args, "subscribe", None, domains[1])
        out, err = subscriber.communicate(timeout=_deadline_s(args) + 30)
        result["stock"] = {"config": "Fast DDS defaults (no XML profile)", **_last_json(out, err, "stock run")}
    return _print_json(result)


# ---------------------------------------------------------------------------------------------------- ends


def make_cloud(points: int, types: Any) -> Any:
    """A driver-like cloud: 64 rings, points on a sphere shell, intensity and per-point time."""
    from sal_ros.core.pointcloud2 import encode_cloud

    rng = np.random.default_rng(SEED)
    xyz = rng.normal(size=(points, 3)).astype(np.float32) * np.float32(20)
    fields = {
        "xyz": xyz,
        "intensity": rng.uniform(0, 255, points).astype(np.float32),
        "ring": (np.arange(points) % 64).astype(np.uint16),
        "t": np.linspace(0, 0.1, points, dtype=np.float32),
    }
    return encode_cloud(fields, "lidar", 0, types)


def publish(args: argparse.Namespace) -> dict[str, Any]:
    """Publisher role: wait for the subscriber to match, then send ``count`` clouds at ``rate``."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data

    from sal_ros.core.msgtypes import rclpy_types

    rclpy.init()
    node = rclpy.create_node("sal_bench_dds_publisher")
    try:
        msg = make_cloud(args.points, rclpy_types())
        pub = node.create_publisher(type(msg), TOPIC, qos_profile_sensor_data)
        deadline = time.monotonic() + args.discovery_timeout
        while pub.get_subscription_count() < 1:
            if time.monotonic() > deadline:
                return {"sent": 0, "error": f"no subscriber matched within {args.discovery_timeout} s"}
            time.sleep(0.02)
        time.sleep(0.3)  # let the reader's side of the match settle before the first sample
        period = 1.0 / args.rate
        start = time.monotonic()
        publish_ms = []
        for i in range(args.count):
            time.sleep(max(0.0, start + i * period - time.monotonic()))
            now = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
            pub.publish(msg)
            publish_ms.append((time.time_ns() - now) / 1e6)
        # Best effort: the writer must outlive the samples in flight (a shared-memory sample dies with its writer's
        # segment), and a 48 MB cloud takes a while to read; the subscriber closes our stdin when it is done.
        select.select([sys.stdin], [], [], LINGER_S)
        return {"sent": args.count, "publish_call_ms_median": round(float(np.median(publish_ms)), 3)}
    finally:
        node.destroy_node()
        rclpy.shutdown()


def subscribe(args: argparse.Namespace, publisher: subprocess.Popen) -> dict[str, Any]:
    """Subscriber role (in this process): count intact clouds and their latency until the publisher is done."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data

    from sal_ros.core.msgtypes import rclpy_types

    expected = bytes(make_cloud(args.points, rclpy_types()).data)
    latencies: list[float] = []
    stamps: set[int] = set()
    corrupt = 0

    def on_cloud(msg: Any) -> None:
        nonlocal corrupt
        arrived = time.time_ns()
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp in stamps:
            return
        stamps.add(stamp)
        latencies.append((arrived - stamp) / 1e6)
        corrupt += msg.width != args.points or bytes(msg.data) != expected

    rclpy.init()
    node = rclpy.create_node("sal_bench_dds_subscriber")
    try:
        node.create_subscription(rclpy_types().PointCloud2, TOPIC, on_cloud, qos_profile_sensor_data)
        hard_deadline = time.monotonic() + _deadline_s(args)
        first = None  # arrival of the first cloud: the last is due (count - 1) / rate later
        while len(stamps) < args.count and time.monotonic() < hard_deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
            if stamps and first is None:
                first = time.monotonic()
            if first is not None:  # lost clouds: stop once the last one is well overdue
                overdue = max(2.0, 5e-3 * float(np.median(latencies)))
                if time.monotonic() > first + (args.count - 1) / args.rate + overdue:
                    break
            if publisher.poll() is not None:  # publisher failed: drain what is still in flight, then stop
                end = time.monotonic() + 1.0
                while len(stamps) < args.count and time.monotonic() < end:
                    rclpy.spin_once(node, timeout_sec=0.05)
                break
    finally:
        node.destroy_node()
        rclpy.shutdown()
    out, err = publisher.communicate(timeout=30)
    sent = _last_json(out, err, "publisher")
    lat = np.asarray(latencies)
    return {
        "received": len(stamps) - corrupt,
        "corrupt": corrupt,
        **sent,
        "latency_ms": {
            "median": round(float(np.median(lat)), 2) if lat.size else None,
            "p90": round(float(np.percentile(lat, 90)), 2) if lat.size else None,
            "max": round(float(lat.max()), 2) if lat.size else None,
        },
    }


# --------------------------------------------------------------------------------------------------- plumbing


def _set_env(env: Any, profile: Path | None, domain_id: int) -> None:
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    for name in PROFILE_ENV:
        env.pop(name, None)
    if profile is None:  # stock: not even a DEFAULT_FASTDDS_PROFILES.xml from the working directory
        env["SKIP_DEFAULT_XML_FILE"] = "1"
    else:
        env.pop("SKIP_DEFAULT_XML_FILE", None)
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(Path(profile).resolve())


def _spawn(args: argparse.Namespace, role: str, profile: Path | None, domain_id: int) -> subprocess.Popen:
    env = dict(os.environ)
    _set_env(env, profile, domain_id)
    cmd = [sys.executable, "-m", "sal_ros.bench.dds", "--role", role, "--count", str(args.count),
           "--rate", str(args.rate), "--points", str(args.points), "--domain-id", str(domain_id),
           "--discovery-timeout", str(args.discovery_timeout)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _deadline_s(args: argparse.Namespace) -> float:
    return args.discovery_timeout + args.count / args.rate + 10.0


def _last_json(out: str, err: str, who: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"bench dds: the {who} printed no result; its stderr:\n{err[-4000:]}")


def _print_json(result: dict[str, Any], indent: int | None = 2) -> int:
    print(json.dumps(result, indent=indent))  # children print one line, the parent reads the last one
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="sal_ros.bench.dds")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
