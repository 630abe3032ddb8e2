"""``sal-ros bench dds``: lidar-sized PointCloud2 across two processes, under the DDS configurations that
``sal-ros doctor`` can recommend, with every cloud accounted for.

Each configuration runs in fresh processes (Fast DDS reads its profile once per process): a subscriber process
spawns a publisher process, which sends ``--count`` clouds at ``--rate`` Hz. The cloud is a real scan
(``--scan``, default SemanticKITTI 00/000000 from ../shared/data: ~124k points, x y z intensity plus a driver's
ring and per-point time) or ``--points`` synthetic points. The publisher puts a sequence number in the frame id, so
the subscriber knows exactly which clouds arrived, which did not (and whether the first one was among them), and
how many of the missing ones Fast DDS itself reported through the subscription's message-lost event (what the
segmenter counts as ``clouds.lost.dds``).

Configurations (``--configs``, comma separated; ``--compare-stock`` is ``both_profiles,stock``):

- ``stock``: Fast DDS defaults on both sides (no XML profile), best effort;
- ``node_profile``: the publisher (a driver) on defaults, the subscriber (the node) with ``--profile``;
- ``both_profiles``: both with ``--profile``;
- ``reliable``: defaults on both sides, reliable QoS on both (a driver that offers reliable);
- ``reliable_node_profile``: reliable, the subscriber with ``--profile``.

``--subscriber-busy`` keeps one thread of the subscriber process busy (numpy work, as a node's model keeps its
process busy), so deliveries compete for the CPU as they do in a segmenter. Discovery stays on localhost
(``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) in a private domain per configuration. Prints JSON on stdout, with
the CPU model and the load average at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sal_ros.bench.env import load_average
from sal_ros.core.msgtypes import rosbags_types
from sal_ros.env import PACKAGE_DIR, claim_free_ros_domain, fastdds_profile_path

PROFILE_ENV = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
TOPIC = "/sal_bench/points"
SEED = 7
LINGER_S = 60.0  # longest a publisher outlives its last sample, waiting for the subscriber to finish
SCAN = ("semantickitti", "sequences", "00", "velodyne", "000000.bin")
SEQ_PREFIX = "lidar_seq_"


def default_scan() -> Path:
    """The real scan sent by default: SemanticKITTI 00/000000 in $SAL_DATA, else ../shared/data."""
    return Path(os.environ.get("SAL_DATA") or PACKAGE_DIR.parent.parent / "shared" / "data").joinpath(*SCAN)


@dataclass(frozen=True)
class Config:
    publisher_profile: bool  # the publisher runs with --profile (else Fast DDS defaults)
    subscriber_profile: bool
    reliability: str  # both ends
    what: str


CONFIGS = {
    "stock": Config(False, False, "best_effort", "Fast DDS defaults on both sides, best effort"),
    "node_profile": Config(False, True, "best_effort", "publisher on defaults, subscriber with the profile, best effort"),
    "both_profiles": Config(True, True, "best_effort", "both with the profile, best effort"),
    "reliable": Config(False, False, "reliable", "Fast DDS defaults on both sides, reliable"),
    "reliable_node_profile": Config(False, True, "reliable", "publisher on defaults, subscriber with the profile, "
                                                              "reliable"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=100, help="clouds to send per configuration (default 100)")
    parser.add_argument("--rate", type=float, default=10.0, help="publish rate in Hz (default 10)")
    parser.add_argument("--scan", type=Path, default=None,
                        help="KITTI .bin scan to send (default: SemanticKITTI 00/000000 in $SAL_DATA, else "
                             "../shared/data, when --points is not given)")
    parser.add_argument("--points", type=int, default=None,
                        help="send this many synthetic points instead of a real scan")
    parser.add_argument("--profile", type=Path, default=fastdds_profile_path(),
                        help="Fast DDS XML profile of the configurations that use one (default: config/fastdds.xml)")
    parser.add_argument("--configs", default="both_profiles",
                        help=f"comma-separated configurations, of {', '.join(CONFIGS)} (default both_profiles)")
    parser.add_argument("--compare-stock", action="store_true", help="same as --configs both_profiles,stock")
    parser.add_argument("--subscriber-busy", action="store_true",
                        help="keep one thread of the subscriber busy, as a node's model does")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID of the first configuration, the next ones count up (default: free ones, "
                             "claimed like the tests do)")
    parser.add_argument("--discovery-timeout", type=float, default=15.0,
                        help="seconds the publisher waits for the subscriber to match (default 15)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds the publisher waits after the match before the first cloud (default 0.3)")
    # internal: the role of a child process
    parser.add_argument("--role", choices=("bench", "publish", "subscribe"), default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--topic", default=TOPIC, help=argparse.SUPPRESS)
    parser.add_argument("--trailer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=tuple(CONFIGS), default="both_profiles", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.role == "publish":
        return _print_json(publish(args), indent=None)
    if args.role == "subscribe":
        config = CONFIGS[args.config]
        publisher = _spawn(args, "publish", args.profile if config.publisher_profile else None, args.domain_id)
        return _print_json(subscribe(args, publisher), indent=None)
    names = ["both_profiles", "stock"] if args.compare_stock else [n.strip() for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        print(f"sal-ros bench dds: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    uses_profile = any(CONFIGS[n].publisher_profile or CONFIGS[n].subscriber_profile for n in names)
    if uses_profile and (args.profile is None or not Path(args.profile).is_file()):
        print(f"sal-ros bench dds: Fast DDS profile not found: {args.profile}", file=sys.stderr)
        return 2
    try:
        source, points = _source(args)
    except (OSError, ValueError) as exc:
        print(f"sal-ros bench dds: {exc}", file=sys.stderr)
        return 2
    from sal_ros.model.runtime import cpu_model

    result: dict[str, Any] = {
        "bench": "dds",
        "source": source,
        "points": points,
        "bytes_per_cloud": len(make_cloud(args, rosbags_types()).data),
        "fields": "x y z intensity (float32) ring (uint16) t (float32)",
        "rate_hz": args.rate,
        "count": args.count,
        "qos": "keep_last 5, volatile; reliability per configuration",
        "discovery": "LOCALHOST",
        "subscriber_busy": args.subscriber_busy,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "profile": str(Path(args.profile).resolve()) if uses_profile else None,
        "configs": {},
    }
    # Free domains held for the whole run, so a test run or another bench on this machine never joins in.
    claims = [claim_free_ros_domain() for _ in names] if args.domain_id is None else []
    domains = [c.domain_id for c in claims] or [args.domain_id + i for i in range(len(names))]
    for name, domain in zip(names, domains):
        config = CONFIGS[name]
        subscriber = _spawn(args, "subscribe", args.profile if config.subscriber_profile else None, domain, name)
        out, err = subscriber.communicate(timeout=_deadline_s(args) + 60)
        result["configs"][name] = {"what": config.what, "domain": domain, **_last_json(out, err, f"{name} run")}
    result["load_average_end"] = load_average()
    return _print_json(result)


# ---------------------------------------------------------------------------------------------------- ends


def _source(args: argparse.Namespace) -> tuple[str, int]:
    if args.points is not None:
        if args.points < 1:
            raise ValueError(f"--points must be >= 1, got {args.points}")
        return "synthetic", args.points
    scan = Path(args.scan or default_scan())
    if not scan.is_file():
        raise OSError(f"scan not found: {scan} (give --scan FILE.bin or --points N)")
    return str(scan), _scan_points(scan)[0].shape[0]


def _scan_points(scan: Path) -> tuple[np.ndarray, np.ndarray]:
    from sal_ros.data.datasets import read_points

    return read_points(scan, 4)


def make_cloud(args: argparse.Namespace, types: Any, limit: int | None = None) -> Any:
    """The cloud a driver would send: a real scan's x y z intensity (or a synthetic shell), 64 rings, per-point
    time; its first ``limit`` points when given."""
    from sal_ros.core.pointcloud2 import encode_cloud

    if args.points is None:
        xyz, intensity = _scan_points(Path(args.scan or default_scan()))
    else:
        rng = np.random.default_rng(SEED)
        xyz = rng.normal(size=(args.points, 3)).astype(np.float32) * np.float32(20)
        intensity = rng.uniform(0, 255, args.points).astype(np.float32)
    xyz, intensity = xyz[:limit], intensity[:limit]
    n = xyz.shape[0]
    fields = {"xyz": xyz, "intensity": intensity, "ring": (np.arange(n) % 64).astype(np.uint16),
              "t": np.linspace(0, 0.1, n, dtype=np.float32)}
    return encode_cloud(fields, SEQ_PREFIX, 0, types)


def _qos(reliability: str) -> Any:
    from sal_ros.nodes.qos import profile

    return profile(reliability, 5)


def publish(args: argparse.Namespace) -> dict[str, Any]:
    """Publisher role: wait for the subscriber to match, then send ``count`` clouds at ``rate``."""
    import rclpy

    from sal_ros.nodes.messages import rclpy_types

    rclpy.init()
    node = rclpy.create_node("sal_bench_dds_publisher")
    try:
        msg = make_cloud(args, rclpy_types())
        pub = node.create_publisher(type(msg), args.topic, _qos(CONFIGS[args.config].reliability))
        deadline = time.monotonic() + args.discovery_timeout
        while pub.get_subscription_count() < 1:
            if time.monotonic() > deadline:
                return {"sent": 0, "error": f"no subscriber matched within {args.discovery_timeout} s"}
            time.sleep(0.02)
        time.sleep(args.settle)  # let the reader's side of the match settle before the first sample
        period = 1.0 / args.rate
        start = time.monotonic()
        publish_ms = []
        for i in range(args.count):
            time.sleep(max(0.0, start + i * period - time.monotonic()))
            now = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
            msg.header.frame_id = f"{SEQ_PREFIX}{i}"
            pub.publish(msg)
            publish_ms.append((time.time_ns() - now) / 1e6)
        if args.trailer:  # a small cloud after the burst: every big one lost shows as a gap before it
            publish_trailer(pub, args)
        # The writer must outlive the samples in flight (a shared-memory sample dies with its writer's segment, a
        # reliable one may need resending); the subscriber closes our stdin when it is done.
        select.select([sys.stdin], [], [], LINGER_S)
        return {"sent": args.count, "publish_call_ms_median": round(float(np.median(publish_ms)), 3)}
    finally:
        node.destroy_node()
        rclpy.shutdown()


TRAILER_POINTS = 1000


def publish_trailer(pub: Any, args: argparse.Namespace) -> None:
    """One small cloud (fits any shared-memory segment, one UDP datagram): a best-effort subscriber gets it, and
    the publisher's sequence number on it reveals each large cloud before it that never arrived."""
    from sal_ros.nodes.messages import rclpy_types

    time.sleep(1.0 / args.rate)
    trailer = make_cloud(args, rclpy_types(), limit=TRAILER_POINTS)
    trailer.header.stamp.sec, trailer.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)
    trailer.header.frame_id = f"{SEQ_PREFIX}trailer"
    pub.publish(trailer)


def _busy(stop: threading.Event) -> None:
    a = np.random.default_rng(0).random((300, 300))
    while not stop.is_set():
        a = np.tanh(a @ a.T / 300.0)


def subscribe(args: argparse.Namespace, publisher: subprocess.Popen) -> dict[str, Any]:
    """Subscriber role: record which clouds arrive intact and what Fast DDS reports lost, until the publisher is
    done."""
    import rclpy
    from rclpy.event_handler import SubscriptionEventCallbacks

    from sal_ros.nodes.messages import rclpy_types

    expected = bytes(make_cloud(args, rclpy_types()).data)
    latencies: list[float] = []
    arrived: set[int] = set()
    corrupt = 0
    reported_lost = 0

    def on_cloud(msg: Any) -> None:
        nonlocal corrupt
        now = time.time_ns()
        seq = int(msg.header.frame_id[len(SEQ_PREFIX):]) if msg.header.frame_id.startswith(SEQ_PREFIX) else -1
        if seq in arrived:
            return
        arrived.add(seq)
        latencies.append((now - (msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)) / 1e6)
        corrupt += bytes(msg.data) != expected

    def on_lost(info: Any) -> None:
        nonlocal reported_lost
        reported_lost += info.total_count_change

    stop = threading.Event()
    if args.subscriber_busy:
        threading.Thread(target=_busy, args=(stop,), daemon=True).start()
    rclpy.init()
    node = rclpy.create_node("sal_bench_dds_subscriber")
    try:
        node.create_subscription(rclpy_types().PointCloud2, args.topic, on_cloud, _qos(CONFIGS[args.config].reliability),
                                 event_callbacks=SubscriptionEventCallbacks(message_lost=on_lost))
        hard_deadline = time.monotonic() + _deadline_s(args)
        first = None  # arrival of the first cloud: the last is due (count - 1) / rate later
        while len(arrived) < args.count and time.monotonic() < hard_deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
            if arrived and first is None:
                first = time.monotonic() - min(arrived) / args.rate
            if first is not None:  # lost clouds: stop once the last one is well overdue
                overdue = max(3.0, 5e-3 * float(np.median(latencies)))
                if time.monotonic() > first + (args.count - 1) / args.rate + overdue:
                    break
            if publisher.poll() is not None:  # publisher failed: drain what is still in flight, then stop
                end = time.monotonic() + 1.0
                while len(arrived) < args.count and time.monotonic() < end:
                    rclpy.spin_once(node, timeout_sec=0.05)
                break
        for _ in range(5):  # a lost-sample event may trail the last delivery
            rclpy.spin_once(node, timeout_sec=0.02)
    finally:
        stop.set()
        node.destroy_node()
        rclpy.shutdown()
    out, err = publisher.communicate(timeout=30)
    sent = _last_json(out, err, "publisher")
    lat = np.asarray(latencies)
    missing = sorted(set(range(sent.get("sent", 0))) - arrived)
    return {
        "received": len(arrived) - corrupt,
        "corrupt": corrupt,
        **sent,
        "missing": missing,
        "first_lost": 0 in missing,
        "reported_lost": reported_lost,  # Fast DDS's message-lost event (what the node counts as lost.dds)
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


def _spawn(args: argparse.Namespace, role: str, profile: Path | None, domain_id: int,
           config: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    _set_env(env, profile, domain_id)
    cmd = [sys.executable, "-m", "sal_ros.bench.dds", "--role", role, "--config", config or args.config,
           "--count", str(args.count), "--rate", str(args.rate), "--domain-id", str(domain_id),
           "--discovery-timeout", str(args.discovery_timeout), "--settle", str(args.settle)]
    if args.points is not None:
        cmd += ["--points", str(args.points)]
    if args.scan is not None:
        cmd += ["--scan", str(args.scan)]
    if args.profile is not None:
        cmd += ["--profile", str(args.profile)]
    if args.subscriber_busy:
        cmd.append("--subscriber-busy")
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
