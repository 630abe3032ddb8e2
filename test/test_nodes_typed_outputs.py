"""Typed outputs seen from another process, as a ROS user sees them: `sal-ros run` (segmenter + recorder) in a
child process, the converted SemanticKITTI bag replayed into it from this process, and subscribers here with
the ROS types (no JSON): ~/detections (vision_msgs/Detection3DArray), ~/frame_summary and ~/vocabulary
(sal_ros_msgs), /diagnostics (diagnostic_msgs/DiagnosticArray) from both nodes. A prompt change through the
node's parameter service shows in all of them with the new version."""
import json
import math
import threading
import time

import numpy as np
import pytest

from conftest import cpu_seconds, require_data, require_rclpy, save_tiny_checkpoint, wait_until

rclpy = require_rclpy()
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile  # noqa: E402

from sal_ros.core.msgtypes import stamp_to_ns  # noqa: E402
from sal_ros.core.pointcloud2 import read_fields  # noqa: E402
from sal_ros.nodes.diagnostics import ERROR, OK, level_of  # noqa: E402

NODE = "/sal_segmenter"
PROMPTS = ["car", "road", "tree"]
NEW_PROMPTS = ["person", "building"]
WAIT_S = 90.0


def wait_for(predicate, what, child, timeout=WAIT_S):
    """Until ``predicate()`` is truthy; fails after ``timeout`` s in which the node process used no CPU."""
    try:
        return wait_until(predicate, what, progress=lambda: round(cpu_seconds(child.proc.pid), 1),
                          check=child.check_alive, stall_s=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{child.log_tail(40)}") from None


class Probe:
    """Bag player and typed subscribers in this process (its own context)."""

    def __init__(self, bag):
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import MultiThreadedExecutor
        from sal_ros_msgs.msg import FrameSummary
        from sal_ros_msgs.msg import Vocabulary as VocabularyMsg
        from sensor_msgs.msg import PointCloud2
        from vision_msgs.msg import Detection3DArray

        from sal_ros.tools.online import playable_topics
        from sal_ros.nodes.qos import latched
        from sal_ros.tools.replay import BagPlayer

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        node = self.node = rclpy.create_node("sal_typed_probe", context=self.context)
        self.player = BagPlayer(node, bag, rate=0.5, clock=False, topics=playable_topics(bag))
        self.lock = threading.Lock()
        self.clouds, self.detections, self.summaries = {}, {}, {}
        self.vocabulary, self.diagnostics = [], []
        qos = QoSProfile(depth=10)
        node.create_subscription(PointCloud2, f"{NODE}/labeled_points", self._keyed(self.clouds), qos)
        node.create_subscription(Detection3DArray, f"{NODE}/detections", self._keyed(self.detections), qos)
        node.create_subscription(FrameSummary, f"{NODE}/frame_summary", self._keyed(self.summaries), qos)
        node.create_subscription(VocabularyMsg, f"{NODE}/vocabulary", self.vocabulary.append, latched())
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self.set_client = node.create_client(SetParameters, f"{NODE}/set_parameters")
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.context)
        self.executor.add_node(node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _keyed(self, store):
        def callback(msg):
            with self.lock:
                store[stamp_to_ns(msg.header.stamp)] = msg
        return callback

    def _on_diagnostics(self, msg):
        with self.lock:
            self.diagnostics.append((time.monotonic(), {s.name: s for s in msg.status}))

    def status(self, name, since=0.0, level=None):
        """The latest status ``name`` received after ``since`` (monotonic s), at ``level`` if given."""
        with self.lock:
            for t, statuses in reversed(self.diagnostics):
                s = statuses.get(name)
                if t >= since and s is not None and (level is None or level_of(s) == level):
                    return s
        return None

    def clear_frames(self):
        with self.lock:
            self.clouds.clear()
            self.detections.clear()
            self.summaries.clear()

    def set_prompts(self, prompts, child):
        from rcl_interfaces.srv import SetParameters

        assert self.set_client.wait_for_service(timeout_sec=WAIT_S)
        param = Parameter("prompts", Parameter.Type.STRING_ARRAY, prompts).to_parameter_msg()
        future = self.set_client.call_async(SetParameters.Request(parameters=[param]))
        wait_for(future.done, "set_parameters response", child)
        return future.result().results[0]

    def close(self):
        self.player.stop()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def values(status):
    return {kv.key: kv.value for kv in status.values}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    seq = require_data("semantickitti", "sequences", "00")
    from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, convert
    from sal_ros.tools.online import NodeProcess, bag_topics
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER

    root = tmp_path_factory.mktemp("typed")
    bag = root / "bag"
    convert(seq, bag, progress=False)
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    sets = {"model.device": "cpu", "model.checkpoint": checkpoint, "text_encoder.model": TINY_TEXT_ENCODER,
            "cloud_topic": CLOUD_TOPIC, "cameras": "[image_0]", "calibration.source": "static",
            "calibration.file": bag / EXTRINSICS_FILE, "prompts": json.dumps(PROMPTS), "score_threshold": 0.0,
            "qos.outputs.depth": 5, "diagnostics_period": 0.2, "input_timeout": 1.0}
    args = ["--params", "config/segment.yaml", "--record", str(root / "frames")]
    child = NodeProcess(args + [f"--set={k}={v}" for k, v in sets.items()], root / "node.log")
    probe = Probe(bag)
    try:
        wait_for(lambda: probe.vocabulary, "the typed vocabulary (model loaded)", child, timeout=180)
        wait_for(lambda: probe.player.publishers[CLOUD_TOPIC].get_subscription_count() >= 2, "inputs matched", child)
        wait_for(lambda: probe.node.count_publishers(f"{NODE}/detections"), "outputs matched", child)
        yield type("Rig", (), {"child": child, "probe": probe, "bag": bag, "clouds": bag_topics(bag)[CLOUD_TOPIC],
                               "root": root})()
    finally:
        probe.close()
        rc = child.stop()
    log = (root / "node.log").read_text(errors="replace")
    assert rc == 0 and "Traceback" not in log, log[-3000:]


def replay(rig):
    """Play the bag once; the (cloud stamp -> (labeled cloud, detections, summary)) of every cloud it holds."""
    probe = rig.probe
    probe.clear_frames()
    probe.player.play()

    def answered():
        with probe.lock:
            stamps = set(probe.clouds) & set(probe.detections) & set(probe.summaries)
            if len(stamps) < rig.clouds:
                return None
            return {s: (probe.clouds[s], probe.detections[s], probe.summaries[s]) for s in stamps}
    return wait_for(answered, "labeled cloud, detections and summary of every replayed cloud", rig.child)


def test_diagnostics_report_silent_input_before_the_replay(rig):
    for node in ("sal_segmenter", "sal_recorder"):
        status = wait_for(lambda: rig.probe.status(f"{node}: input", level=ERROR), f"{node} input ERROR", rig.child)
        assert "no frame since start" in status.message and status.hardware_id == f"/{node}"
    model = wait_for(lambda: rig.probe.status("sal_segmenter: model"), "model status", rig.child)
    assert (level_of(model), values(model)["device"], values(model)["vocabulary version"]) == (OK, "cpu", "1")


def test_replay_gives_typed_detections_summaries_and_vocabulary(rig):
    from sal_ros_msgs.msg import Vocabulary as VocabularyMsg

    vocab = rig.probe.vocabulary[0]
    assert isinstance(vocab, VocabularyMsg) and vocab.version == 1
    assert [c.name for c in vocab.classes] == PROMPTS
    assert [list(c.descriptions) for c in vocab.classes] == [[p] for p in PROMPTS] and all(c.thing for c in vocab.classes)
    assert len({(c.color.r, c.color.g, c.color.b) for c in vocab.classes}) == len(PROMPTS)

    t0 = time.monotonic()
    frames = replay(rig)
    assert len(frames) == rig.clouds == 2
    for stamp, (cloud, dets, summary) in frames.items():
        assert dets.header.frame_id == summary.header.frame_id == cloud.header.frame_id != ""
        assert stamp_to_ns(dets.header.stamp) == stamp_to_ns(cloud.header.stamp) == stamp
        instance = read_fields(cloud, ["instance"])["instance"]
        ids = sorted(int(d.id) for d in dets.detections)
        assert ids and ids == sorted(np.unique(instance[instance > 0]).tolist())  # one detection per instance
        for det in dets.detections:
            scores = [r.hypothesis.score for r in det.results]
            classes = [r.hypothesis.class_id for r in det.results]
            assert sorted(classes) == sorted(PROMPTS)  # the top 3 of 3 classes: all ranked, not only the best
            assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
            q = det.bbox.center.orientation
            assert math.isclose(q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2, 1.0, rel_tol=1e-6)
            assert min(det.bbox.size.x, det.bbox.size.y, det.bbox.size.z) >= 0
        assert summary.vocabulary_version == 1
        assert summary.num_points == cloud.width * cloud.height and summary.num_instances == len(ids)
        assert {"segment", "track"} <= set(summary.stage_names)
        assert summary.tracking_frame == cloud.header.frame_id  # no fixed frame configured
    first, second = (frames[s][2] for s in sorted(frames))
    assert first.num_new_tracks == first.num_instances  # every instance of the first frame starts a track
    assert second.num_active_tracks >= second.num_instances

    # health after the frames: input OK, processing with per-stage timings, recorder with its frames
    seg_input = wait_for(lambda: rig.probe.status("sal_segmenter: input", since=t0, level=OK), "input OK", rig.child)
    assert float(values(seg_input)["frames in window"]) >= 2
    processing = wait_for(lambda: rig.probe.status("sal_segmenter: processing", since=t0), "processing", rig.child)
    assert "total median (ms)" in values(processing) and "model.backbone median (ms)" in values(processing)
    recording = wait_for(lambda: (lambda s: s if s and int(values(s)["frames in store"]) >= 2 else None)(
        rig.probe.status("sal_recorder: recording", since=t0)), "recorder with 2 frames", rig.child)
    assert level_of(recording) == OK


def test_prompt_change_shows_in_every_typed_output(rig):
    probe = rig.probe
    result = probe.set_prompts(NEW_PROMPTS, rig.child)
    assert result.successful, result.reason
    v2 = wait_for(lambda: next((v for v in probe.vocabulary if v.version == 2), None), "vocabulary v2", rig.child)
    assert [c.name for c in v2.classes] == NEW_PROMPTS
    t0 = time.monotonic()
    frames = replay(rig)
    for cloud, dets, summary in frames.values():
        assert summary.vocabulary_version == 2
        assert (read_fields(cloud, ["vocabulary_version"])["vocabulary_version"] == 2).all()
        assert all(sorted(r.hypothesis.class_id for r in d.results) == sorted(NEW_PROMPTS) for d in dets.detections)
    model = wait_for(lambda: rig.probe.status("sal_segmenter: model", since=t0), "model status", rig.child)
    assert values(model)["vocabulary version"] == "2" and "vocabulary v2" in model.message
