"""Lidar poses for Seal's temporal term from a recording: the recorder stores, with each frame, the tf2 transform
pose_frame -> cloud frame at the cloud stamp (real node, real DDS, /tf + /tf_static published here); the FrameStore
keeps them compatibly (stores without poses still load) and pretrain's frame_poses reads them back."""
import json
import threading

import numpy as np
import pytest

from conftest import Sensors, require_data, wait_for
from sal_ros.core.types import Frame
from sal_ros.data.framestore import FRAMES_DIR, INDEX_FILE, FrameStore, framestore_poses


def _pose(yaw, x, y, z):
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = x, y, z
    return T


def _frame(stamp):
    return Frame(stamp_ns=stamp, frame_id="lidar", points=np.arange(12, dtype=np.float32).reshape(4, 3),
                 key=str(stamp))


def test_framestore_keeps_poses_and_old_frames_load_without(tmp_path):
    root = tmp_path / "store"
    with FrameStore(root) as store:
        store.append(_frame(1), (_pose(0.3, 1.0, 2.0, 0.5), "odom"))
        store.append(_frame(2))  # no pose: as a store written before poses existed
        store.append(_frame(3), (_pose(-0.1, 4.0, 0.0, 0.0), "map"))
    store = FrameStore(root)
    assert np.array_equal(store.pose("1")[0], _pose(0.3, 1.0, 2.0, 0.5)) and store.pose("1")[1] == "odom"
    assert store.pose("2") is None and store.load("2").num_points == 4
    poses, why = framestore_poses(root, "odom")
    assert list(poses) == ["1"] and np.array_equal(poses["1"], _pose(0.3, 1.0, 2.0, 0.5))
    assert why.startswith("2 of 3 frames have no pose in 'odom'") and "'map'" in why

    # a frame file renamed into place by a writer killed before its index line: re-indexed with its pose
    lines = (root / INDEX_FILE).read_text().splitlines(keepends=True)
    (root / INDEX_FILE).write_text("".join(lines[:2]))
    with FrameStore(root) as again:
        again.append(_frame(4))
    assert np.array_equal(FrameStore(root).pose("3")[0], _pose(-0.1, 4.0, 0.0, 0.0))
    assert json.loads((root / INDEX_FILE).read_text().splitlines()[2])["pose_frame"] == "map"
    assert sorted(p.name for p in (root / FRAMES_DIR).iterdir()) == ["1.npz", "2.npz", "3.npz", "4.npz"]


def test_framestore_refuses_a_pose_that_is_not_a_transform(tmp_path):
    with FrameStore(tmp_path / "store") as store, pytest.raises(ValueError, match="4x4"):
        store.append(_frame(1), (np.eye(3), "odom"))


def _tf_msg(parent, child, T, stamp_ns):
    from geometry_msgs.msg import TransformStamped

    from sal_ros.core.transforms import matrix_to_transform_fields

    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = parent, child
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    (x, y, z), (qx, qy, qz, qw) = matrix_to_transform_fields(T)
    tr, rot = msg.transform.translation, msg.transform.rotation
    tr.x, tr.y, tr.z = float(x), float(y), float(z)
    rot.x, rot.y, rot.z, rot.w = float(qx), float(qy), float(qz), float(qw)
    return msg


@pytest.fixture()
def ros(tmp_path):
    """The recorder (lidar only, poses in odom) and this test's publisher node, spun by one executor."""
    from conftest import require_rclpy

    rclpy = require_rclpy()
    pytest.importorskip("tf2_ros", reason="tf2_ros not importable")
    from rclpy.executors import MultiThreadedExecutor

    from sal_ros.nodes import params as P
    from sal_ros.nodes.recorder import RecorderNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    # sync.timeout bounds how long a frame waits for its /tf (the clouds are stamped now, /tf may come later)
    values = {"output_dir": str(tmp_path / "frames"), "cloud_topic": "/rp/points", "sync.timeout": 2.0,
              "stats_period": 0.2}
    recorder = RecorderNode(context=ctx, parameter_overrides=P.overrides(P.RECORDER_NODE, values))
    node = rclpy.create_node("recorder_poses_test", context=ctx)
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(recorder)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    yield node, tmp_path / "frames"
    executor.shutdown()
    recorder.destroy_node()
    node.destroy_node()
    rclpy.try_shutdown(context=ctx)


def test_recorder_stores_the_lidar_pose_from_tf_and_pretrain_reads_it(ros):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import String
    from tf2_msgs.msg import TFMessage

    from sal_ros.core.transforms import transform_msg_to_matrix
    from sal_ros.data.sources import FrameSource
    from sal_ros.pretrain.cache import frame_poses

    node, out = ros
    require_data("semantickitti", "sequences", "00")
    sensors = Sensors(out.parent)
    cloud_pub = node.create_publisher(PointCloud2, "/rp/points", qos_profile_sensor_data)
    tf_pub = node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    static_pub = node.create_publisher(TFMessage, "/tf_static", QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    stats = []
    node.create_subscription(String, "/sal_recorder/stats", lambda m: stats.append(json.loads(m.data)), 10)
    wait_for(lambda: all(p.get_subscription_count() > 0 for p in (cloud_pub, tf_pub, static_pub)),
             what="recorder subscribed to the cloud, /tf and /tf_static")

    base = node.get_clock().now().nanoseconds
    mount = _tf_msg("base_link", "velodyne", _pose(0.02, 0.8, 0.0, 1.7), base)
    static_pub.publish(TFMessage(transforms=[mount]))
    motion = [_tf_msg("odom", "base_link", _pose(0.1 * i, 1.5 * i, 0.2 * i, 0.0), base + i * 100_000_000)
              for i in range(4)]
    for msg in motion:
        tf_pub.publish(TFMessage(transforms=[msg]))

    # a cloud before the first /tf (no pose: recorded all the same), then two at /tf stamps
    stamps = [base - 5_000_000_000, base + 100_000_000, base + 200_000_000]
    for n, stamp in enumerate(stamps, 1):
        cloud_pub.publish(sensors.cloud(stamp))
        wait_for(lambda: (out / INDEX_FILE).exists() and len(FrameStore(out)) >= n, what=f"{n} frames recorded")

    store = FrameStore(out)
    assert store.keys() == [str(s) for s in stamps] and store.pose(str(stamps[0])) is None
    T_base_lidar = transform_msg_to_matrix(mount)
    expected = {str(stamps[i]): transform_msg_to_matrix(motion[i]) @ T_base_lidar for i in (1, 2)}
    for key, T in expected.items():
        got, fixed = store.pose(key)
        assert fixed == "odom" and np.allclose(got, T, rtol=0, atol=1e-9)
        assert np.array_equal(store.load(key).points, sensors.xyz)

    poses, why = frame_poses(FrameSource(out), "odom")
    assert sorted(poses) == sorted(expected) and all(np.allclose(poses[k], expected[k], atol=1e-9) for k in poses)
    assert why.startswith("1 of 3 frames have no pose in 'odom'")
    record = wait_for(lambda: next((r for r in reversed(stats) if r["counts"].get("recorded") == 3), None),
                      what="a ~/stats record after the third frame")
    assert record["counts"].get("pose_missing") == 1
