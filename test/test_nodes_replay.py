"""`sal-ros replay`: a rosbag2 written with rosbags comes out through rclpy, in order, with /clock."""
import threading

import numpy as np
import pytest

from conftest import require_data, require_rclpy, wait_until
from sal_ros.core.msgtypes import rosbags_types
from sal_ros.core.pointcloud2 import encode_cloud, read_xyz

rclpy = require_rclpy()
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402

T0 = 1_700_000_000_000_000_000


def _write_bag(path, scans, storage):
    from rosbags.rosbag2 import StoragePlugin, Writer

    types = rosbags_types()
    store = types.typestore
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection("/points", "sensor_msgs/msg/PointCloud2", typestore=store)
        for i, xyz in enumerate(scans):
            stamp = T0 + i * 100_000_000
            msg = encode_cloud({"xyz": xyz}, "velodyne", stamp, types)
            writer.write(conn, stamp, store.serialize_cdr(msg, "sensor_msgs/msg/PointCloud2"))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_replay_publishes_bag_in_order_with_clock(tmp_path, storage):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import PointCloud2

    from sal_ros.tools.replay import BagPlayer

    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"),
                       np.float32).reshape(-1, 4)[:, :3]
    scans = [scan[i::3] for i in range(3)]
    bag = tmp_path / "bag"
    _write_bag(bag, scans, storage)

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        listener = rclpy.create_node("listener", context=ctx)
        player_node = rclpy.create_node("player", context=ctx)
        clouds, clocks = [], []
        listener.create_subscription(PointCloud2, "/points", clouds.append, qos_profile_sensor_data)
        listener.create_subscription(Clock, "/clock", lambda m: clocks.append(m.clock.sec * 10**9 + m.clock.nanosec),
                                     10)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(listener)
        executor.add_node(player_node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        player = BagPlayer(player_node, bag, rate=4.0, topics=["/points", "/absent"])
        assert sorted(player.publishers) == ["/points"]
        # waits that follow progress (a loaded machine is slower, not red): no subscriber for 60 s is a failure
        wait_until(lambda: player.publishers["/points"].get_subscription_count(), "the listener", stall_s=60)
        assert player.play() == 3
        wait_until(lambda: len(clouds) >= 3, "3 clouds", progress=lambda: len(clouds), stall_s=60)
        executor.shutdown()
    finally:
        rclpy.shutdown(context=ctx)
    assert len(clouds) == 3
    for got, sent in zip(clouds, scans):
        assert np.array_equal(read_xyz(got), sent)
    stamps = [c.header.stamp.sec * 10**9 + c.header.stamp.nanosec for c in clouds]
    assert stamps == [T0, T0 + 100_000_000, T0 + 200_000_000]
    assert clocks and clocks == sorted(clocks) and clocks[-1] == T0 + 200_000_000 and clocks[0] >= T0
