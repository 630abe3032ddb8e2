"""The installed package with the real ROS 2 tools, as a user runs it: `ros2 launch sal_ros segment.launch.py
params_file:=...` (colcon install, CPU, tiny model) in its own process group; this process publishes the real
KITTI scan and image over DDS and gets the labeled cloud, markers and overlay back; `ros2 param describe` and
`ros2 param set` through the CLI change the vocabulary or are refused with the reason; `record:=true` writes frames
that `sal-ros pseudolabel` reads; a terminal's Ctrl-C (SIGINT to the whole group) ends launch and every node with
exit 0 and nothing unclean in the output, also while a frame is in a (deliberately slow) model. A node started by
`ros2 run` keeps the DDS environment it was given."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import REPO, require_data, require_rclpy, save_tiny_checkpoint, wait_until
from ros_install import GroupProcess, colcon_install, unclean_lines

rclpy = require_rclpy()
from rclpy.qos import QoSProfile  # noqa: E402

from sal_ros.core.msgtypes import stamp_to_ns  # noqa: E402
from sal_ros.core.pointcloud2 import read_fields  # noqa: E402

NODE = "/sal_segmenter"
CAMERA = "image_0"
PROMPTS = ["car", "road", "tree"]
SHUTDOWN_RUNS = 10


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The environment of a shell with this package colcon-installed and sourced."""
    return colcon_install(tmp_path_factory.mktemp("colcon"))


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    """The SemanticKITTI sample as a bag (static extrinsics beside it) and its (cloud, image, info) messages."""
    seq = require_data("semantickitti", "sequences", "00")
    from sal_ros.data.convert import convert

    root = tmp_path_factory.mktemp("kitti")
    convert(seq, root / "bag", progress=False)
    return root / "bag", bag_frames(root / "bag")


def bag_frames(bag):
    from rclpy.serialization import deserialize_message
    from rosbags.highlevel import AnyReader

    from sal_ros.data.convert import CLOUD_TOPIC, image_topic, info_topic
    from sal_ros.tools.replay import message_class

    topics = {CLOUD_TOPIC: [], image_topic(CAMERA): [], info_topic(CAMERA): []}
    with AnyReader([bag]) as reader:
        for conn, _, raw in reader.messages(connections=[c for c in reader.connections if c.topic in topics]):
            topics[conn.topic].append(deserialize_message(bytes(raw), message_class(conn.msgtype)))
    return list(zip(*topics.values()))


def write_params(path, bag, checkpoint, **segmenter):
    """A robot's params file: the bag's topics and static extrinsics, the given checkpoint on CPU."""
    import yaml

    from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, image_topic, info_topic
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER

    doc = {
        "/**": {"ros__parameters": {
            "cloud_topic": CLOUD_TOPIC, "cameras": [CAMERA],
            "camera": {CAMERA: {"image_topic": image_topic(CAMERA), "info_topic": info_topic(CAMERA)}},
            "calibration": {"source": "static", "file": str(bag / EXTRINSICS_FILE)}, "stats_period": 0.25}},
        "sal_segmenter": {"ros__parameters": {
            "model": {"checkpoint": str(checkpoint), "device": "cpu"}, "text_encoder": {"model": TINY_TEXT_ENCODER},
            "prompts": PROMPTS, "score_threshold": 0.0, **segmenter}},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


class Probe:
    """This process's side of DDS: the node's inputs published, its outputs and ~/stats collected."""

    def __init__(self):
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from std_msgs.msg import String
        from visualization_msgs.msg import MarkerArray

        from sal_ros.data.convert import CLOUD_TOPIC, image_topic, info_topic

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        node = self.node = rclpy.create_node("sal_launch_probe", context=self.context)
        qos = QoSProfile(depth=10)
        self.pub = {"cloud": node.create_publisher(PointCloud2, CLOUD_TOPIC, qos),
                    "image": node.create_publisher(Image, image_topic(CAMERA), qos),
                    "info": node.create_publisher(CameraInfo, info_topic(CAMERA), qos)}
        self.got = {"clouds": {}, "markers": {}, "overlays": {}}
        self.stats = {}  # node name -> latest ~/stats record
        node.create_subscription(PointCloud2, f"{NODE}/labeled_points", self._keep("clouds"), qos)
        node.create_subscription(MarkerArray, f"{NODE}/markers", self._keep("markers"), qos)
        node.create_subscription(Image, f"{NODE}/overlay/{CAMERA}", self._keep("overlays"), qos)
        for name in ("sal_segmenter", "sal_recorder"):
            node.create_subscription(String, f"/{name}/stats", self._stats(name), qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def _keep(self, store):
        def callback(msg):
            header = msg.markers[-1].header if store == "markers" else msg.header
            self.got[store][stamp_to_ns(header.stamp)] = msg
        return callback

    def _stats(self, name):
        return lambda msg: self.stats.__setitem__(name, json.loads(msg.data))

    def count(self, node, key):
        return self.stats.get(node, {}).get("counts", {}).get(key, 0)

    def connected(self, with_recorder=False):
        """Inputs matched by the node(s), outputs matched here."""
        subscribers = 2 if with_recorder else 1
        return (all(p.get_subscription_count() >= subscribers for p in self.pub.values())
                and self.node.count_publishers(f"{NODE}/labeled_points") > 0)

    def publish(self, frame, stamp_ns):
        cloud, image, info = frame
        for msg in (info, image, cloud):
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        self.pub["info"].publish(info)
        self.pub["image"].publish(image)
        self.pub["cloud"].publish(cloud)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def launch(env, log_path, params, *args):
    return GroupProcess(["ros2", "launch", "sal_ros", "segment.launch.py", f"params_file:={params}", *args],
                        env, log_path)


def ros2(env, *args, timeout=300):
    """The `ros2` command line without the daemon; node discovery is waited for with --timeout (see docs/ros.md)."""
    return subprocess.run(["ros2", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def running(installed, kitti, tmp_path_factory):
    """`ros2 launch ... record:=true` on the tiny checkpoint, and the probe connected to both nodes."""
    bag, frames = kitti
    root = tmp_path_factory.mktemp("launch")
    params = write_params(root / "robot.yaml", bag, save_tiny_checkpoint(root / "tiny.pt"))
    proc = launch(installed, root / "launch.log", params, "record:=true", f"record_dir:={root / 'frames'}")
    probe = Probe()
    try:
        wait_until(lambda: probe.connected(with_recorder=True), "the launched nodes to connect",
                   progress=lambda: len(proc.log()), check=proc.check_alive)
        yield type("Running", (), {"proc": proc, "probe": probe, "frames": frames, "root": root,
                                   "env": installed, "next_stamp": stamp_to_ns(frames[-1][0].header.stamp)})()
    finally:
        probe.close()
        proc.close()


def send(running, frame_index=0):
    """Publish one bag frame with a fresh stamp; returns the stamp."""
    running.next_stamp += 100_000_000
    running.probe.publish(running.frames[frame_index], running.next_stamp)
    return running.next_stamp


def answer(running, stamp, store="clouds"):
    return wait_until(lambda: running.probe.got[store].get(stamp), f"{store} at {stamp}",
                      progress=lambda: len(running.proc.log()), check=running.proc.check_alive)


# ------------------------------------------------------------------------------------------------- tests


def test_the_launched_nodes_run_from_the_colcon_install_with_the_callers_dds(running):
    prefix = ros2(running.env, "pkg", "prefix", "sal_ros")
    assert prefix.returncode == 0 and prefix.stdout.strip() == running.env["AMENT_PREFIX_PATH"].split(":")[0]
    log = running.proc.log()
    assert f"{prefix.stdout.strip()}/lib/sal_ros/segmenter" in log or "segmenter-1" in log
    # Launch and node set nothing: what this test session exported is what the nodes run with.
    profile = running.env["FASTDDS_DEFAULT_PROFILES_FILE"]
    lines = [line for line in log.splitlines() if "DDS environment:" in line]
    assert len(lines) == 2, log[-3000:]  # segmenter and recorder
    for line in lines:
        assert "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST" in line and f"FASTDDS_DEFAULT_PROFILES_FILE={profile}" in line


def test_real_scan_and_image_come_back_labeled_with_markers_and_overlay(running):
    cloud, image, _ = running.frames[0]
    stamp = send(running)
    out = answer(running, stamp)
    sent, got = read_fields(cloud), read_fields(out)
    assert out.width * out.height == cloud.width * cloud.height == 124668 and out.header.frame_id == cloud.header.frame_id
    for axis in ("x", "y", "z", "intensity"):
        assert np.array_equal(got[axis], sent[axis]), axis
    assert (got["vocabulary_version"] == 1).all() and got["label"].max() <= len(PROMPTS)
    markers = answer(running, stamp, "markers").markers
    assert [m.id for m in markers if m.ns == "vocabulary"] == [1]
    overlay = answer(running, stamp, "overlays")
    assert (overlay.width, overlay.height, overlay.encoding) == (image.width, image.height, "rgb8")


def test_ros2_param_describe_and_set_through_the_cli(running):
    env = running.env
    described = ros2(env, "param", "describe", "--no-daemon", "--timeout", "120", NODE, "prompts")
    assert described.returncode == 0, described.stderr
    assert "Type: string array" in described.stdout and "Description:" in described.stdout
    refused = ros2(env, "param", "set", "--no-daemon", "--timeout", "120", NODE, "prompts", "['car', 'Car']")
    assert "Setting parameter failed" in refused.stderr and "duplicates prompt 0" in refused.stderr, refused
    got = ros2(env, "param", "get", "--no-daemon", "--timeout", "120", NODE, "prompts")
    assert all(p in got.stdout for p in PROMPTS), got  # the refused value was not stored
    new = ["car", "person", "traffic cone"]
    changed = ros2(env, "param", "set", "--no-daemon", "--timeout", "120", NODE, "prompts", str(new))
    assert changed.returncode == 0 and "Set parameter successful" in changed.stdout, changed
    # The new vocabulary is embedded in the background: frames answer with version 1 until it is swapped in.
    version = 1
    while version == 1:
        version = int(read_fields(answer(running, send(running)), ["vocabulary_version"])["vocabulary_version"][0])
    assert version == 2
    assert read_fields(answer(running, send(running)), ["label"])["label"].max() <= len(new)


@pytest.mark.timeout(900)
def test_recorded_frames_feed_pseudolabel_and_ctrl_c_ends_everything_cleanly(running):
    probe = running.probe
    before = probe.count("sal_recorder", "recorded")
    for index in (0, 1):
        answer(running, send(running, index))
    wait_until(lambda: probe.count("sal_recorder", "recorded") >= before + 2, "two recorded frames",
               progress=lambda: len(running.proc.log()), check=running.proc.check_alive)
    rc = running.proc.interrupt()
    log = running.proc.log()
    assert rc == 0 and not unclean_lines(log), log[-4000:]
    assert log.count("process has finished cleanly") == 2, log[-4000:]
    frames, out = running.root / "frames", running.root / "pseudolabels"
    done = subprocess.run([sys.executable, "-m", "sal_ros.cli", "pseudolabel", str(frames), "--out", str(out),
                           "--masks", "slic", "--slic-segments", "30", "--no-tokens", "--no-refine", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["done"] >= 2 and len(list(out.glob("*.npz"))) == summary["done"]


@pytest.mark.soak
@pytest.mark.timeout(1800)  # ten launches of a CPU model on a shared machine; each wait follows progress
def test_ctrl_c_ends_launch_and_every_node_cleanly_ten_times_with_a_frame_in_the_model(installed, kitti,
                                                                                       tmp_path):
    """The model is made slow on purpose (40 decoder rounds attending down to stride 1: seconds per scan), so
    every Ctrl-C lands while the worker is inside it: after the node counted the frame as handed over and before
    any output. The launch arguments set DDS explicitly here (a copy of the shipped profile): the nodes get them."""
    import torch

    from sal_ros.model.config import ModelConfig
    from sal_ros.model.checkpoint import save_checkpoint
    from sal_ros.model.sal import SALModel
    from sal_ros.model.text_encoder import tiny_text_encoder

    bag, frames = kitti
    torch.manual_seed(0)
    slow = ModelConfig.preset("tiny", voxel_size=0.05, decoder_rounds=40, attention_strides=(16, 8, 4, 2, 1))
    checkpoint = save_checkpoint(tmp_path / "slow.pt", SALModel(slow).eval(), text_encoder_identity=tiny_text_encoder())
    params = write_params(tmp_path / "robot.yaml", bag, checkpoint)
    profile = shutil.copy(REPO / "config" / "fastdds.xml", tmp_path / "my_profile.xml")
    env = dict(installed, OMP_NUM_THREADS="1")
    probe = Probe()
    clean = []
    try:
        for run in range(SHUTDOWN_RUNS):
            proc = launch(env, tmp_path / f"launch{run}.log", params, "discovery_range:=LOCALHOST",
                          f"fastdds_profile:={profile}")
            try:
                wait_until(probe.connected, "the launched node to connect", progress=lambda: len(proc.log()),
                           check=proc.check_alive)
                probe.stats.clear()
                stamp = 1_700_000_000_000_000_000 + run * 10**9
                probe.publish(frames[0], stamp)
                wait_until(lambda: probe.count("sal_segmenter", "matched") >= 1, "the frame handed to the worker",
                           progress=lambda: len(proc.log()), check=proc.check_alive)
                in_model = probe.count("sal_segmenter", "processed") == 0 and stamp not in probe.got["clouds"]
                rc = proc.interrupt()
            finally:
                proc.close()
            log = proc.log()
            assert f"FASTDDS_DEFAULT_PROFILES_FILE={profile}" in log
            clean.append(in_model and rc == 0 and not unclean_lines(log) and "finished cleanly" in log)
            assert clean[-1], (run, in_model, rc, unclean_lines(log), log[-4000:])
    finally:
        probe.close()
    print(f"\nCtrl-C with a frame in the model: {sum(clean)} of {SHUTDOWN_RUNS} runs clean")


def test_ros2_run_keeps_the_dds_environment_it_is_given(installed, tmp_path):
    """Nothing in the package sets RMW_IMPLEMENTATION, the discovery range or the Fast DDS profile for a node
    started by `ros2 run` (a robot's lidar driver on another host must stay visible). Discovery OFF keeps this
    node to itself; the variables the test leaves unset stay unset."""
    env = {k: v for k, v in installed.items() if k not in ("RMW_IMPLEMENTATION", "FASTDDS_DEFAULT_PROFILES_FILE")}
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "OFF"
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER

    proc = GroupProcess(["ros2", "run", "sal_ros", "segmenter", "--ros-args", "-p", f"model.checkpoint:={checkpoint}",
                         "-p", "model.device:=cpu", "-p", f"text_encoder.model:={TINY_TEXT_ENCODER}"],
                        env, tmp_path / "run.log")
    try:
        proc.wait_log("listening on", "the node to start")
    finally:
        rc = proc.interrupt() if proc.proc.poll() is None else proc.close()
    log = proc.log()
    assert ("RMW_IMPLEMENTATION=<unset>" in log and "ROS_AUTOMATIC_DISCOVERY_RANGE=OFF" in log
            and "FASTDDS_DEFAULT_PROFILES_FILE=<unset>" in log), log[-3000:]
    assert rc == 0 and not unclean_lines(log), log[-3000:]
