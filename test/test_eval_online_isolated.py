"""`sal-ros eval online` counts only the answers of the node it started (issue 14 item 8): with `--domain auto` a
foreign node on this machine publishing labeled clouds and statistics under the segmenter's names neither answers
for it nor stands in for its statistics; answers match the bag's clouds by stamp; stamp_age is left out when it is
meaningless. By default it runs in the caller's ROS_DOMAIN_ID, and `--domain N` picks one (issue 26 item 6)."""
import json
import threading

import numpy as np

from conftest import eval_online, require_rclpy, wait_until

from sal_ros.nodes.messages import rclpy_types
from sal_ros.core.pointcloud2 import encode_cloud
from sal_ros.tools.online import OnlineResult, match_answers


class Foreign:
    """Another /sal_segmenter on this machine (this test run's domain), talking nonsense at 20 Hz."""

    def __init__(self):
        rclpy = require_rclpy()
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import String

        self.rclpy, self.context, self.String = rclpy, rclpy.Context(), String
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("sal_segmenter", context=self.context)
        qos = QoSProfile(depth=10)
        self.clouds = self.node.create_publisher(PointCloud2, "/sal_segmenter/labeled_points", qos)
        self.stats = self.node.create_publisher(String, "/sal_segmenter/stats", qos)
        self.sent, self.k = 0, 0
        self.node.create_timer(0.05, self._tick)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _tick(self):
        self.k += 1
        xyz = np.zeros((4, 3), np.float32)
        self.clouds.publish(encode_cloud({"xyz": xyz, "label": np.ones(4, np.uint16)}, "lidar",
                                         1_000_000_000 * self.k, rclpy_types()))
        self.stats.publish(self.String(data=json.dumps({"counts": {"foreign": self.k}, "timings": {}})))
        self.sent += 1

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def test_a_foreign_node_of_the_same_name_neither_answers_nor_reports(eval_online_rig):
    foreign = Foreign()
    try:
        wait_until(lambda: foreign.sent >= 5, "the foreign node publishing", stall_s=60)
        out = eval_online_rig.root / "foreign"
        proc = eval_online(eval_online_rig.bag, "--params", eval_online_rig.params, "--out", out, "--rate", "1",
                           "--set", "stats_period=0.5", "--domain", "auto")
        assert foreign.sent > 20  # it went on through the whole evaluation
    finally:
        foreign.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "online.json").read_text())
    assert summary["clouds_sent"] == 2 and 1 <= summary["clouds_answered"] <= 2
    assert summary["clouds_answered"] + summary["dropped"] == 2 and summary["drop_rate"] >= 0
    assert "foreign" not in summary["node_counts"] and summary["node_counts"].get("processed", 0) >= 1
    assert "stamp_age" not in summary["node_timings_ms"]  # KITTI stamps of 1970 + 1 s, no /clock: meaningless


def test_answers_are_matched_by_stamp():
    msg = encode_cloud({"xyz": np.zeros((2, 3), np.float32)}, "lidar", 5, rclpy_types())
    outputs = {5: (2.0, msg), 7: (2.5, msg), 9: (3.0, msg)}  # 7 and 9: not clouds of this replay
    result = match_answers(OnlineResult(clouds_sent=1), outputs, {5: 1.5}, {5})
    summary = result.summary()
    assert (summary["clouds_answered"], summary["dropped"], summary["ignored_outputs"]) == (1, 0, 2)
    assert result.latency_ms == {5: 500.0}


def test_stamp_age_is_reported_only_when_meaningful():
    def timings(age_ms):
        stats = {"counts": {}, "timings": {"stamp_age": {"median_ms": age_ms, "p90_ms": age_ms, "max_ms": age_ms},
                                           "total": {"median_ms": 5.0, "p90_ms": 6.0, "max_ms": 7.0}}}
        return OnlineResult(clouds_sent=0, node_stats=stats).summary()["node_timings_ms"]

    assert "stamp_age" not in timings(1.8e12) and "total" in timings(1.8e12)  # 57 years
    assert timings(12.0)["stamp_age"]["median"] == 12.0


def _domain_in_node_log(out):
    log = (out / "node.log").read_text()
    line = next(line for line in log.splitlines() if "DDS environment:" in line)
    return int(line.split("ROS_DOMAIN_ID=")[1].split(",")[0])


def test_the_callers_ros_domain_is_used_and_domain_chooses_another(eval_online_rig):
    """The node and the bag player run in ROS_DOMAIN_ID (this session's private domain, from conftest) unless
    --domain names one (here another free domain, claimed the way conftest claims its own)."""
    import os

    from sal_ros.env import claim_free_ros_domain

    session = int(os.environ["ROS_DOMAIN_ID"])
    runs = {}
    other = claim_free_ros_domain()
    try:
        for name, extra in (("env", []), ("chosen", ["--domain", str(other.domain_id)])):
            out = eval_online_rig.root / f"domain_{name}"
            proc = eval_online(eval_online_rig.bag, "--params", eval_online_rig.params, "--out", out, "--rate", "1",
                               *extra)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            runs[name] = (_domain_in_node_log(out), json.loads((out / "online.json").read_text()))
    finally:
        other.release()
    assert other.domain_id != session
    assert runs["env"][0] == session and runs["env"][1]["meta"]["domain"] == session
    assert runs["chosen"][0] == other.domain_id and runs["chosen"][1]["meta"]["domain"] == other.domain_id
    assert all(summary["clouds_answered"] >= 1 for _, summary in runs.values())


def test_a_bad_domain_is_refused_with_the_reason(eval_online_rig):
    proc = eval_online(eval_online_rig.bag, "--params", eval_online_rig.params, "--out",
                       eval_online_rig.root / "bad", "--domain", "robot")
    assert proc.returncode != 0 and "--domain must be auto or a domain id" in proc.stderr, proc.stderr[-2000:]
