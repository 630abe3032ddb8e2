"""Online figures: replay a bag into sal_ros nodes running in their own process, as on a robot, and measure from
the topics.

``sal-ros eval online BAG --params node.yaml`` starts ``sal-ros run`` (real rclpy, DDS on localhost), waits until
its subscriptions match and its vocabulary is embedded, plays the bag into it, and collects every labeled cloud.
Reported: clouds sent / answered / dropped, end-to-end latency measured here (input cloud received -> its labeled
cloud received, one process clock, so DDS hops count), and the node's own ``~/stats`` (per-stage medians and
p90, in-node latency from cloud receipt to publication, counters).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sal_ros.core.files import atomic_write, write_json
from sal_ros.core.msgtypes import stamp_to_ns
from sal_ros.core.pointcloud2 import read_fields
from sal_ros.env import apply_ros_env_defaults, claim_free_ros_domain
from sal_ros.nodes import params as P
from sal_ros.tools.replay import BagPlayer, message_class
from sal_ros.tools.run import parameter_values, parse_sets, spin_until_shutdown

SEGMENTER = "/sal_segmenter"
# The node's stamp_age (ROS now - cloud stamp) describes a live sensor; replaying an old bag without /clock it
# reads the bag's age (57 years for KITTI's), so it is reported only below this.
STAMP_AGE_MEANINGFUL_MS = 60_000.0
MAX_DOMAIN_ID = 232  # the largest domain id Fast DDS and Cyclone DDS accept (ports stay below 65535)


@dataclass
class OnlineResult:
    clouds_sent: int
    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # cloud stamp -> labeled fields
    latency_ms: dict[int, float] = field(default_factory=dict)  # cloud stamp -> end-to-end latency
    node_stats: dict = field(default_factory=dict)  # the node's last ~/stats record
    ignored_outputs: int = 0  # labeled clouds whose stamp is none of the bag's (not an answer to this replay)

    def summary(self) -> dict[str, Any]:
        lat = np.array(list(self.latency_ms.values()), float)
        answered = len(self.outputs)
        timings = dict(self.node_stats.get("timings", {}))
        age = timings.get("stamp_age", {}).get("median_ms")
        if age is not None and age > STAMP_AGE_MEANINGFUL_MS:  # bag stamps on another clock (no /clock)
            timings.pop("stamp_age")
        return {
            "clouds_sent": self.clouds_sent,
            "clouds_answered": answered,
            "dropped": self.clouds_sent - answered,
            "drop_rate": round((self.clouds_sent - answered) / self.clouds_sent, 4) if self.clouds_sent else None,
            "end_to_end_ms": _percentiles(lat),
            "node_counts": self.node_stats.get("counts", {}),
            "node_timings_ms": {k: {"median": v["median_ms"], "p90": v.get("p90_ms"), "max": v["max_ms"]}
                                for k, v in timings.items()},
            "ignored_outputs": self.ignored_outputs,
            "first_frame": self.first_frame(),
        }

    def first_frame(self) -> dict[str, float | None]:
        """The first cloud's latency beside the median (the goal: within 1.5x), end to end and in the node (its
        ~/stats first_frame_ms against the median of ``total``); ratios None when there is nothing to compare."""
        out: dict[str, float | None] = {"end_to_end_ms": None, "end_to_end_vs_median": None,
                                        "node_total_ms": None, "node_total_vs_median": None}
        if self.latency_ms:
            first = self.latency_ms[min(self.latency_ms)]
            out["end_to_end_ms"] = round(first, 1)
            out["end_to_end_vs_median"] = _ratio(first, float(np.median(list(self.latency_ms.values()))))
        node_first = (self.node_stats.get("first_frame_ms") or {}).get("total")
        if node_first is not None:
            out["node_total_ms"] = node_first
            median = self.node_stats.get("timings", {}).get("total", {}).get("median_ms")
            out["node_total_vs_median"] = _ratio(node_first, median)
        return out


def _ratio(value: float, reference: float | None) -> float | None:
    return round(value / reference, 2) if reference else None


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"median": None, "p90": None, "max": None, "n": 0}
    return {"median": round(float(np.median(values)), 1), "p90": round(float(np.percentile(values, 90)), 1),
            "max": round(float(values.max()), 1), "n": int(values.size)}


class NodeProcess:
    """``sal-ros run ARGS`` in a child process (its output to ``log_path``); ``stop()`` sends Ctrl-C."""

    def __init__(self, run_args: list[str], log_path: str | Path, domain_id: int | None = None) -> None:
        apply_ros_env_defaults()  # the child inherits localhost-only discovery, domain and Fast DDS profile
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
        if domain_id is not None:
            env["ROS_DOMAIN_ID"] = str(domain_id)
        self.proc = subprocess.Popen([sys.executable, "-m", "sal_ros.cli", "run", *run_args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the node process exited with code {self.proc.returncode}; see {self.log_path}:\n"
                               + self.log_tail())

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "NodeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class BagProbe:
    """This process's side: a bag player plus subscriptions to the input cloud and the segmenter's outputs."""

    def __init__(self, bag: str | Path, rate: float, cloud_topic: str, collect: bool, domain_id: int | None = None):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import String

        from sal_ros.nodes.qos import latched  # rclpy loads only when a probe runs

        self._stamp_to_ns = stamp_to_ns
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("sal_eval_online", context=self.context)
        # /tf_static plays where tf2_msgs is installed (robots); elsewhere the node reads a static calibration file
        self.player = BagPlayer(self.node, Path(bag), rate=rate, clock=False, topics=playable_topics(bag))
        self.cloud_topic = cloud_topic
        self.received: dict[int, float] = {}  # input cloud stamp -> monotonic s when it arrived here
        self.outputs: dict[int, tuple[float, Any]] = {}
        self.vocabulary: list[dict] = []
        self.stats: list[dict] = []
        self._lock = threading.Lock()
        self.node.create_subscription(PointCloud2, cloud_topic, self._on_input, qos_profile_sensor_data)
        if collect:
            reliable = QoSProfile(depth=10)
            self.node.create_subscription(PointCloud2, f"{SEGMENTER}/labeled_points", self._on_output, reliable)
            self.node.create_subscription(String, f"{SEGMENTER}/stats",
                                          lambda m: self.stats.append(json.loads(m.data)), reliable)
            self.node.create_subscription(String, f"{SEGMENTER}/debug/vocabulary",
                                          lambda m: self.vocabulary.append(json.loads(m.data)), latched())
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=spin_until_shutdown, args=(self.executor,), daemon=True)
        self._spinner.start()

    def _on_input(self, msg: Any) -> None:
        with self._lock:
            self.received.setdefault(self._stamp_to_ns(msg.header.stamp), time.monotonic())

    def _on_output(self, msg: Any) -> None:
        with self._lock:
            self.outputs.setdefault(self._stamp_to_ns(msg.header.stamp), (time.monotonic(), msg))

    def inputs_matched(self, topics: list[str]) -> bool:
        """True when every bag publisher among ``topics`` has a subscriber besides this probe."""
        pubs = self.player.publishers
        own = {self.cloud_topic: 1}
        return all(pubs[t].get_subscription_count() > own.get(t, 0) for t in topics if t in pubs)

    def close(self) -> None:
        import rclpy

        self.player.stop()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, node: NodeProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if node is not None:
            node.check_alive()
        time.sleep(0.05)
    tail = f"\nnode log ({node.log_path}):\n{node.log_tail()}" if node is not None else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")


def bag_topics(bag: str | Path) -> dict[str, int]:
    """Topic -> message count of a rosbag2."""
    from sal_ros.data.bag import open_bag

    with open_bag(bag) as reader:
        return {c.topic: c.msgcount for c in reader.connections}


def playable_topics(bag: str | Path) -> list[str]:
    """Topics of ``bag`` whose message types rclpy can import here."""
    from sal_ros.data.bag import open_bag

    with open_bag(bag) as reader:
        return sorted({c.topic for c in reader.connections if message_class(c.msgtype) is not None})


def replay(bag: str | Path, run_args: list[str], log_path: str | Path, *, cloud_topic: str, rate: float = 1.0,
           segmenter: bool = True, done: Callable[[], bool] | None = None, start_timeout_s: float = 180.0,
           finish_timeout_s: float = 120.0, domain_id: int | None = None) -> OnlineResult:
    """Start ``sal-ros run RUN_ARGS``, play ``bag`` into it once and collect what comes back, in a free ROS domain
    claimed for the run (or ``domain_id``). Answers are matched to the bag's clouds by stamp.

    Without ``segmenter`` (a recorder run) nothing is collected and ``done`` says when the node has finished.
    """

    topics = bag_topics(bag)
    if cloud_topic not in topics:
        raise ValueError(f"{bag} has no {cloud_topic} (topics: {sorted(topics)})")
    sent = topics[cloud_topic]
    sent_stamps = bag_stamps(bag, cloud_topic)
    # A domain of its own for the node and this probe: a robot stack, another run or any node of the same name
    # elsewhere on the machine can neither answer for the node nor stand in for its statistics.
    claim = claim_free_ros_domain() if domain_id is None else None
    domain_id = claim.domain_id if claim is not None else domain_id
    with NodeProcess(run_args, log_path, domain_id) as node:
        probe = BagProbe(bag, rate, cloud_topic, collect=segmenter, domain_id=domain_id)
        try:
            wanted = [t for t in probe.player.publishers if not t.startswith("/tf")]
            wait_until(lambda: probe.inputs_matched(wanted), start_timeout_s, "the node's subscriptions", node)
            if segmenter:
                wait_until(lambda: probe.vocabulary, start_timeout_s, "the node's vocabulary (model ready)", node)
                wait_until(lambda: probe.node.count_subscribers(f"{SEGMENTER}/labeled_points") >= 1,
                           start_timeout_s, "output discovery", node)
            time.sleep(0.5)  # discovery of the reverse direction (outputs -> probe) settles
            probe.player.play()
            finished = done or (lambda: len(sent_stamps.intersection(probe.outputs)) >= sent)
            try:
                wait_until(finished, finish_timeout_s, "the node's answers", node)
            except TimeoutError:
                if not segmenter:
                    raise
            if segmenter:  # the node's final counters and timings
                n = len(probe.stats)
                try:
                    wait_until(lambda: len(probe.stats) > n, 15.0, "a ~/stats record", node)
                except TimeoutError:
                    pass
        finally:
            probe.close()
            if claim is not None:
                claim.release()
    result = OnlineResult(clouds_sent=sent, node_stats=probe.stats[-1] if probe.stats else {})
    return match_answers(result, probe.outputs, probe.received, sent_stamps)


def match_answers(result: OnlineResult, outputs: dict[int, tuple[float, Any]], received: dict[int, float],
                  sent_stamps: set[int]) -> OnlineResult:
    """Only a labeled cloud stamped like a cloud of the bag answers it; any other is counted as ignored."""

    for stamp, (t_out, msg) in sorted(outputs.items()):
        if stamp not in sent_stamps:
            result.ignored_outputs += 1
            continue
        result.outputs[stamp] = read_fields(msg)
        if stamp in received:
            result.latency_ms[stamp] = (t_out - received[stamp]) * 1e3
    return result


def bag_stamps(bag: str | Path, topic: str) -> set[int]:
    """header.stamp (ns) of every message on ``topic`` in the bag: the clouds this replay sends."""
    from sal_ros.data.bag import open_bag

    with open_bag(bag) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        return {stamp_to_ns(reader.deserialize(raw, conn.msgtype).header.stamp)
                for conn, _, raw in reader.messages(connections=conns)}


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", type=Path, help="rosbag2 to replay (e.g. from `sal-ros convert`)")
    parser.add_argument("--params", type=Path, required=True,
                        help="node params YAML (topics, cameras, model.checkpoint, ...), as for `sal-ros run`")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="passed to `sal-ros run`")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    parser.add_argument("--out", type=Path, required=True, help="folder for online.json, online.md and node.log")
    parser.add_argument("--domain", default=None, metavar="ID|auto",
                        help="ROS domain of the node and the bag player (default: ROS_DOMAIN_ID, else 0, as every ROS "
                             "tool); auto: a free domain claimed for the run, so no other node on this machine (a "
                             "robot stack, another run, a node of the same name) meets them")


def _ms(value) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def online_headline(summary: dict) -> str:
    lat = summary["end_to_end_ms"]
    drop = summary["drop_rate"]
    return (f"{summary['clouds_answered']}/{summary['clouds_sent']} clouds answered, drop rate "
            f"{'–' if drop is None else f'{100 * drop:.1f} %'}, end-to-end latency median {_ms(lat['median'])}, "
            f"p90 {_ms(lat['p90'])}" + _first_frame_words(summary.get("first_frame") or {}))


def _first_frame_words(first: dict) -> str:
    if first.get("end_to_end_ms") is None:
        return ""
    node = "" if first.get("node_total_ms") is None else \
        f"; in the node {_ms(first['node_total_ms'])} ({first['node_total_vs_median']}x its median)"
    return f", first frame {_ms(first['end_to_end_ms'])} ({first['end_to_end_vs_median']}x the median{node})"


def online_markdown(summary: dict) -> str:
    """online.md: the headline, end-to-end latency and the node's per-stage timings as tables."""
    lat = summary["end_to_end_ms"]
    lines = ["# Online evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in summary.get("meta", {}).items()]
    lines += ["", online_headline(summary), "",
              "| clouds sent | answered | dropped | drop rate | latency median (ms) | p90 (ms) | max (ms) |",
              "|---|---|---|---|---|---|---|",
              f"| {summary['clouds_sent']} | {summary['clouds_answered']} | {summary['dropped']} | "
              f"{summary['drop_rate']} | {lat['median']} | {lat['p90']} | {lat['max']} |", ""]
    timings = summary.get("node_timings_ms") or {}
    if timings:
        lines += ["Node timings (its last ~/stats record):", "", "| stage | median (ms) | p90 (ms) | max (ms) |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {t['median']} | {t['p90']} | {t['max']} |" for name, t in timings.items()]
        lines.append("")
    counts = summary.get("node_counts") or {}
    if counts:
        lines += ["Node counters: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""]
    return "\n".join(lines)


def domain_of(choice: str | None, environ: dict[str, str] = os.environ) -> int | None:
    """The ``--domain`` choice as a domain id; None for ``auto`` (replay claims a free one)."""
    if choice == "auto":
        return None
    text = choice if choice is not None else environ.get("ROS_DOMAIN_ID", "").strip() or "0"
    if not text.isdigit() or not 0 <= int(text) <= MAX_DOMAIN_ID:
        where = "--domain" if choice is not None else "ROS_DOMAIN_ID"
        raise ValueError(f"{where} must be auto or a domain id 0..{MAX_DOMAIN_ID}, got {text!r}")
    return int(text)


def main(args: argparse.Namespace) -> int:
    """``sal-ros eval online``: errors raise (the eval command prints them), a node that fails returns 1."""
    if not args.bag.exists():
        raise FileNotFoundError(f"{args.bag} does not exist")
    if not args.params.is_file():
        raise FileNotFoundError(f"--params {args.params} does not exist")
    if args.rate <= 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    domain_id = domain_of(args.domain)
    values = parameter_values(P.SEGMENTER_NODE, args.params, parse_sets(args.set), {})
    cloud_topic = values.get("cloud_topic", "/points")
    run_args = ["--params", str(args.params)] + [f"--set={s}" for s in args.set]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "node.log"
    try:
        result = replay(args.bag, run_args, log, cloud_topic=cloud_topic, rate=args.rate, domain_id=domain_id)
    except (TimeoutError, RuntimeError) as exc:  # the node did not start, died, or never answered
        print(f"sal-ros eval online: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    summary["meta"] = {"bag": str(args.bag), "params": str(args.params), "sets": list(args.set),
                       "domain": "auto" if domain_id is None else domain_id,
                       "rate": args.rate, "cloud_topic": cloud_topic, "node_log": str(log)}
    json_path = write_json(args.out / "online.json", summary)
    md_path = atomic_write(args.out / "online.md", online_markdown(summary))
    print(f"{online_headline(summary)} -> {json_path}, {md_path}")
    return 0
