"""`sal-ros doctor` (issue 26): each check's verdict on both sides, on a fake /proc and /dev root, real profiles,
a real tiny checkpoint, a real bound DDS port, and live topics published over DDS on localhost."""
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, require_rclpy, save_tiny_checkpoint

from sal_ros.tools.doctor import machine  # noqa: E402
from sal_ros.tools.doctor.params_file import params_checks  # noqa: E402
from sal_ros.tools.doctor.report import EXIT  # noqa: E402

SHIPPED = REPO / "config" / "fastdds.xml"


def fake_root(tmp_path, rmem=4194304, wmem=4194304, high=134217728, ttl=3, shm=True):
    root = tmp_path / "root"
    for rel, value in (("proc/sys/net/core/rmem_max", rmem), ("proc/sys/net/core/wmem_max", wmem),
                       ("proc/sys/net/ipv4/ipfrag_high_thresh", high), ("proc/sys/net/ipv4/ipfrag_time", ttl)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{value}\n")
    if shm:
        (root / "dev" / "shm").mkdir(parents=True)
    return root


def verdicts(checks):
    return {c.name: c.verdict for c in checks}


def test_socket_buffers_below_the_profile_warn(tmp_path):
    transports = machine.read_profile(SHIPPED)
    low = verdicts(machine.check_socket_buffers(fake_root(tmp_path / "a", rmem=212992, wmem=212992), transports))
    assert low == {"net.core.rmem_max": "warn", "net.core.wmem_max": "warn"}
    good = verdicts(machine.check_socket_buffers(fake_root(tmp_path / "b", rmem=8388608, wmem=4194304), transports))
    assert good == {"net.core.rmem_max": "ok", "net.core.wmem_max": "ok"}
    advice = machine.check_socket_buffers(fake_root(tmp_path / "c", rmem=212992), transports)[0].advice
    assert "sysctl -w net.core.rmem_max=4194304" in advice


def test_ip_fragment_settings_matter_between_hosts_only(tmp_path):
    remote, cloud = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"}, machine.CLOUD_BYTES
    stock = verdicts(machine.check_ipfrag(fake_root(tmp_path / "a", high=4194304, ttl=30), remote, cloud))
    assert stock == {"net.ipv4.ipfrag_high_thresh": "warn", "net.ipv4.ipfrag_time": "warn"}
    tuned = verdicts(machine.check_ipfrag(fake_root(tmp_path / "b", high=134217728, ttl=3), remote, cloud))
    assert tuned == {"net.ipv4.ipfrag_high_thresh": "ok", "net.ipv4.ipfrag_time": "ok"}
    local = machine.check_ipfrag(fake_root(tmp_path / "c", high=4194304, ttl=30),
                                 {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}, cloud)
    assert [c.verdict for c in local] == ["info"] and "4194304" in local[0].detail


def test_shared_memory_missing_small_or_enough(tmp_path):
    assert machine.check_shm(fake_root(tmp_path / "a", shm=False) / "dev" / "shm", None).verdict == "fail"
    shm = fake_root(tmp_path / "b") / "dev" / "shm"
    (shm / "fastdds_0123").write_bytes(b"")
    ok = machine.check_shm(shm, machine.read_profile(SHIPPED))
    assert ok.verdict == "ok" and "1 Fast DDS segment(s)" in ok.detail
    # a segment larger than the filesystem holding it: the verdict turns
    huge = {"shm": {"segment_size": os.statvfs(shm).f_blocks * os.statvfs(shm).f_frsize, "max_message_size": None}}
    assert machine.check_shm(shm, huge).verdict == "warn"


def test_profile_checks(tmp_path):
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}

    def check(path, extra=None):
        e = {**env, **(extra or {})}
        if path is not None:
            e["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
        p = machine.profile_file(e)
        return machine.check_profile(e, p, machine.read_profile(p) if p and p.is_file() else None, machine.CLOUD_BYTES)

    assert check(None).verdict == "warn"  # stock Fast DDS
    assert check(tmp_path / "missing.xml").verdict == "fail"
    bad = tmp_path / "bad.xml"
    bad.write_text("<dds><profiles>")
    assert check(bad).verdict == "fail"
    assert check(SHIPPED).verdict == "ok"
    # the shipped profile keeps UDP on loopback: with discovery reaching other hosts, their clouds never arrive
    assert check(SHIPPED, {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"}).verdict == "warn"
    whole = tmp_path / "whole.xml"  # a segment without maxMessageSize: each cloud must fit it whole
    whole.write_text(SHIPPED.read_text().replace("<maxMessageSize>1048576</maxMessageSize>", "")
                     .replace("33554432", "4194304"))
    assert check(whole).verdict == "warn"
    transports = machine.read_profile(SHIPPED)
    assert transports["shm"] == {"segment_size": 33554432, "max_message_size": 1048576}
    assert transports["udp"]["whitelist"] == ["127.0.0.1"] and transports["builtin"] is False


def test_rmw_check():
    assert machine.check_rmw({}).verdict == "ok"
    assert machine.check_rmw({"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"}).verdict == "ok"
    assert machine.check_rmw({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}).verdict == "warn"


def test_other_participants_on_the_domain_warn():
    from sal_ros.env import claim_free_ros_domain

    claim = claim_free_ros_domain()
    try:
        env = {"ROS_DOMAIN_ID": str(claim.domain_id), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
        assert machine.check_domain(env).verdict == "ok"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as participant:  # what a participant binds
            participant.bind(("127.0.0.1", 7410 + 250 * claim.domain_id))
            busy = machine.check_domain(env)
        assert busy.verdict == "warn" and "1 participant(s)" in busy.detail
    finally:
        claim.release()
    assert machine.check_domain({"ROS_DOMAIN_ID": "abc"}).verdict == "fail"


def write_params(path, **values):
    import yaml

    path.write_text(yaml.safe_dump({"sal_segmenter": {"ros__parameters": values}}))
    return path


def test_params_file_checkpoint_vocabulary_and_calibration(tmp_path):
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    good = write_params(tmp_path / "good.yaml", **{"model.checkpoint": str(ckpt), "text_encoder.model": TINY_TEXT_ENCODER,
                                                   "prompts": ["car", "road"]})
    _, checks = params_checks(good)
    assert verdicts(checks) == {"params file": "ok", "checkpoint": "ok", "vocabulary": "ok", "cameras": "ok"}
    # the checkpoint was trained with another text encoder than the params give
    other = write_params(tmp_path / "other.yaml", **{"model.checkpoint": str(ckpt)})
    assert verdicts(params_checks(other)[1])["checkpoint"] == "warn"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    broken = write_params(tmp_path / "broken.yaml", **{"model.checkpoint": str(corrupt),
                                                       "vocabulary_file": str(tmp_path / "none.yaml"),
                                                       "cameras": ["cam0"], "calibration.source": "static",
                                                       "calibration.file": str(tmp_path / "none.yaml")})
    assert verdicts(params_checks(broken)[1]) == {"params file": "ok", "checkpoint": "fail", "vocabulary": "fail",
                                                    "cameras": "fail"}
    typo = write_params(tmp_path / "typo.yaml", **{"prompt": ["car"]})
    assert verdicts(params_checks(typo)[1])["params file"] == "warn"


def doctor(*args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "sal_ros.cli", "doctor", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_exit_codes_and_json(tmp_path):
    env = dict(os.environ, FASTDDS_DEFAULT_PROFILES_FILE=str(SHIPPED), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RMW_IMPLEMENTATION="rmw_fastrtps_cpp", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    tuned = doctor("--root", str(fake_root(tmp_path / "a")), "--json", env=env)
    result = json.loads(tuned.stdout)
    by_name = {c["name"]: c for c in result["checks"]}
    assert by_name["net.core.rmem_max"]["verdict"] == "ok" and by_name["fastdds profile"]["verdict"] == "ok"
    assert tuned.returncode == result["exit_code"] == max(EXIT[c["verdict"]] for c in result["checks"])
    low = doctor("--root", str(fake_root(tmp_path / "b", rmem=212992)), env=env)
    assert low.returncode >= 1 and "[WARN] net.core.rmem_max" in low.stdout and "sysctl -w" in low.stdout
    no_shm = doctor("--root", str(fake_root(tmp_path / "c", shm=False)), env=env)
    assert no_shm.returncode == 3 and "[FAIL] shared memory" in no_shm.stdout
    missing = doctor("--params", str(tmp_path / "none.yaml"), env=env)
    assert missing.returncode == 2 and "params file not found" in missing.stderr


@pytest.mark.ros
@pytest.mark.timeout(300)
def test_live_checks_find_the_cloud_and_flag_a_qos_mismatch(tmp_path):
    rclpy = require_rclpy()
    from sal_ros.bench.dds import make_cloud
    from sal_ros.nodes.messages import rclpy_types
    from sal_ros.nodes.qos import profile

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("doctor_driver", context=context)
    msg = make_cloud(type("A", (), {"points": 2000, "scan": None})(), rclpy_types())
    msg.header.frame_id = "velodyne"
    pub = node.create_publisher(type(msg), "/doctor/points", profile("best_effort", 5))
    stop = threading.Event()

    def drive():
        while not stop.wait(0.1):
            pub.publish(msg)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        ok = write_params(tmp_path / "ok.yaml", cloud_topic="/doctor/points")
        done = doctor("--params", str(ok), "--live", "--wait", "60", "--json")
        live = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["live cloud /doctor/points"]
        assert live["verdict"] == "ok" and "2000 points" in live["detail"] and "'velodyne'" in live["detail"], live
        reliable = write_params(tmp_path / "rel.yaml", cloud_topic="/doctor/points", **{"qos.cloud.reliability":
                                                                                        "reliable"})
        done = doctor("--params", str(reliable), "--live", "--wait", "60", "--json")
        live = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["live cloud /doctor/points"]
        assert live["verdict"] == "fail" and "never match" in live["detail"] and done.returncode == 3
        nothing = write_params(tmp_path / "none.yaml", cloud_topic="/doctor/nobody")
        done = doctor("--params", str(nothing), "--live", "--wait", "1", "--json")
        live = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["live cloud /doctor/nobody"]
        assert live["verdict"] == "fail" and "no publisher within 1 s" in live["detail"]
    finally:
        stop.set()
        thread.join(5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.ros
@pytest.mark.timeout(400)
def test_live_camera_and_transform_checks(tmp_path):
    """Real KITTI messages over DDS: cam0 with its image, CameraInfo and a static transform velodyne -> cam0 is OK;
    cam1 publishes images but no transform reaches it: FAIL, after the bounded wait."""
    rclpy = require_rclpy()
    from geometry_msgs.msg import TransformStamped
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from tf2_ros import StaticTransformBroadcaster

    from conftest import Sensors
    from sal_ros.nodes.qos import profile

    sensors = Sensors(tmp_path)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("doctor_rig", context=context)
    pubs = {"cloud": node.create_publisher(PointCloud2, "/rig/points", profile("best_effort", 2)),
            "cam0": node.create_publisher(Image, "/cam0/image_raw", profile("best_effort", 2)),
            "cam0_info": node.create_publisher(CameraInfo, "/cam0/camera_info", profile("best_effort", 2)),
            "cam1": node.create_publisher(Image, "/cam1/image_raw", profile("best_effort", 2))}
    cam1 = sensors.image_msg(1)
    cam1.header.frame_id = "cam1"
    tf = TransformStamped()
    tf.header.frame_id, tf.child_frame_id = "velodyne", "cam0"
    tf.transform.rotation.w = 1.0
    static = StaticTransformBroadcaster(node)
    static.sendTransform(tf)
    stop = threading.Event()

    def drive():
        while not stop.wait(0.2):
            pubs["cloud"].publish(sensors.cloud(1))
            pubs["cam0"].publish(sensors.image_msg(1))
            pubs["cam0_info"].publish(sensors.info(1))
            pubs["cam1"].publish(cam1)

    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=context)  # serves the transient-local /tf_static to late joiners
    executor.add_node(node)
    threads = [threading.Thread(target=drive, daemon=True), threading.Thread(target=executor.spin, daemon=True)]
    for t in threads:
        t.start()
    try:
        params = write_params(tmp_path / "cams.yaml", cloud_topic="/rig/points", cameras=["cam0", "cam1"])
        done = doctor("--params", str(params), "--live", "--wait", "20", "--json")
        checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
        assert checks["live cloud /rig/points"]["verdict"] == "ok", checks
        assert checks["live camera cam0"]["verdict"] == "ok" and "CameraInfo 1241x376" in \
            checks["live camera cam0"]["detail"], checks["live camera cam0"]
        assert checks["live camera cam1"]["verdict"] == "warn"  # images, no CameraInfo
        assert checks["live transform cam0"]["verdict"] == "ok", checks["live transform cam0"]
        assert checks["live transform cam1"]["verdict"] == "fail" and "'velodyne' -> 'cam1'" in \
            checks["live transform cam1"]["detail"]
        assert done.returncode == 3
    finally:
        stop.set()
        executor.shutdown()
        for t in threads:
            t.join(5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
