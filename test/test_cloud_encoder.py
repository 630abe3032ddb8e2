"""CloudEncoder (issue 17): the labeled cloud's data buffer is reused from frame to frame. Every cloud it encodes
is byte-identical to a fresh encode_cloud, padding stays zero when the point count or layout changes, and clouds
(and pooled markers) published back to back through rclpy reach a real subscriber intact although they share one
buffer (one set of markers)."""
import numpy as np
import pytest

from conftest import require_rclpy, wait_until
from sal_ros.core.pointcloud2 import CloudEncoder, encode_cloud, read_fields

require_rclpy()
from sal_ros.nodes.messages import rclpy_types  # noqa: E402


def _fields(n, seed, version=3):
    rng = np.random.default_rng(seed)
    return {"xyz": rng.normal(scale=20, size=(n, 3)).astype(np.float32), "intensity": rng.random(n, np.float32),
            "label": rng.integers(0, 20, n).astype(np.uint16),
            "vocabulary_version": np.broadcast_to(np.uint16(version), (n,)),
            "instance": rng.integers(0, 99, n).astype(np.uint32), "score": rng.random(n, np.float32),
            "ring": rng.integers(0, 64, n).astype(np.uint8)}  # 29 bytes: 3 bytes of padding a point


def _same(a, b):
    assert bytes(a.data) == bytes(b.data)
    assert [(f.name, f.offset, f.datatype, f.count) for f in a.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in b.fields]
    assert (a.width, a.point_step, a.row_step, a.is_dense, a.header) == (b.width, b.point_step, b.row_step,
                                                                          b.is_dense, b.header)


def test_reused_buffer_gives_the_fresh_encoding_for_growing_shrinking_and_changed_clouds():
    types = rclpy_types()
    encoder = CloudEncoder(types)
    first = encoder.encode(_fields(40_000, 0), "lidar", 5)
    buffer = first.data
    for n, seed in ((40_000, 1), (50_000, 2), (1_000, 3), (40_000, 4), (0, 5), (7, 6)):
        fields = _fields(n, seed)
        _same(encoder.encode(fields, "lidar", 5), encode_cloud(fields, "lidar", 5, types))
    assert encoder.encode(_fields(10, 7), "lidar", 5).data is buffer  # reused, resized in place
    other = {"xyz": np.ones((10, 3), np.float32), "label": np.arange(10, dtype=np.uint16)}  # another layout
    _same(encoder.encode(other, "lidar", 5), encode_cloud(other, "lidar", 5, types))
    _same(encoder.encode(_fields(10, 8), "lidar", 5), encode_cloud(_fields(10, 8), "lidar", 5, types))


def test_a_cloud_someone_still_views_is_left_to_them():
    types = rclpy_types()
    encoder = CloudEncoder(types)
    held = encoder.encode(_fields(100, 0), "lidar", 5)
    view = read_fields(held)["x"]  # a view into held.data: the buffer cannot be resized under it
    before = view.copy()
    fresh = encoder.encode(_fields(200, 1), "lidar", 5)
    assert fresh.data is not held.data and np.array_equal(view, before)
    _same(fresh, encode_cloud(_fields(200, 1), "lidar", 5, types))


def test_float64_xyz_and_count_fields_match_the_fresh_encoding():
    types = rclpy_types()
    rng = np.random.default_rng(0)
    fields = {"xyz": rng.normal(size=(33_000, 3)), "normal": rng.random((33_000, 3), np.float32),
              "flag": rng.random(33_000) > 0.5}
    _same(CloudEncoder(types).encode(fields, "l", 1), encode_cloud(fields, "l", 1, types))
    got = read_fields(encode_cloud(fields, "l", 1, types))
    assert np.array_equal(np.stack([got["x"], got["y"], got["z"]], 1), fields["xyz"].astype(np.float32))


def test_clouds_published_back_to_back_from_one_buffer_arrive_intact():
    rclpy = require_rclpy()
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    types = rclpy_types()
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("cloud_encoder_test", context=context)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        got = []
        node.create_subscription(PointCloud2, "clouds", got.append, qos)
        pub = node.create_publisher(PointCloud2, "clouds", qos)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        wait_until(lambda: executor.spin_once(timeout_sec=0.05) or pub.get_subscription_count() > 0,
                   "the subscriber matching", stall_s=30)
        frames = [_fields(120_000, 1, 1), _fields(120_000, 2, 2), _fields(90_000, 3, 3)]
        encoder = CloudEncoder(types)
        for k, fields in enumerate(frames):  # back to back: each overwrites the buffer the last one was sent from
            pub.publish(encoder.encode(fields, "lidar", k))
        wait_until(lambda: executor.spin_once(timeout_sec=0.05) or len(got) >= len(frames),
                   "the three clouds arriving", progress=lambda: len(got), stall_s=30)
        for k, fields in enumerate(frames):
            _same(got[k], encode_cloud(fields, "lidar", k, types))
        _markers_back_to_back(node, executor, qos, types)
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_xyz_decoded_as_records_is_a_copy_equal_to_the_fields():
    from sal_ros.bench.codec import make_driver_cloud
    from sal_ros.core.pointcloud2 import read_xyz

    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(1000, 3)).astype(np.float32)
    xyz[5] = np.nan
    msg = make_driver_cloud(xyz, rng.random(1000, np.float32), rclpy_types())
    got = read_xyz(msg)
    assert got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, xyz)
    got[:] = 0  # its own memory: the message is untouched
    np.testing.assert_array_equal(read_xyz(msg), xyz)


def _markers_back_to_back(node, executor, qos, types):
    from rclpy.serialization import deserialize_message, serialize_message
    from visualization_msgs.msg import MarkerArray

    from sal_ros.core.types import InstanceSummary, OrientedBox
    from sal_ros.nodes import outputs

    got = []
    node.create_subscription(MarkerArray, "markers", got.append, qos)
    pub = node.create_publisher(MarkerArray, "markers", qos)
    wait_until(lambda: executor.spin_once(timeout_sec=0.05) or pub.get_subscription_count() > 0,
               "the marker subscriber matching", stall_s=30)
    frames = [[InstanceSummary(k, 1, "car", 0.5, 10, OrientedBox(np.full(3, float(f)), np.ones(3), 0.1 * k))
               for k in range(3 + f)] for f in range(3)]
    pool, palette = outputs.MarkerPool(), outputs.class_colors(1)
    for f, instances in enumerate(frames):
        pub.publish(outputs.instance_markers(instances, "lidar", f, palette, types, pool=pool))
    wait_until(lambda: executor.spin_once(timeout_sec=0.05) or len(got) >= len(frames),
               "the three marker arrays arriving", progress=lambda: len(got), stall_s=30)
    for f, instances in enumerate(frames):  # through the wire, as a fresh array would arrive (colours are float32)
        fresh = outputs.instance_markers(instances, "lidar", f, palette, types)
        assert got[f] == deserialize_message(serialize_message(fresh), MarkerArray)
