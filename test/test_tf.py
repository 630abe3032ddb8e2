"""Extrinsics seam: StaticExtrinsics and Tf2Extrinsics (tf2_ros from make setup or apt); the message naming the
fix where tf2_ros cannot be imported."""
import sys

import numpy as np
import pytest
from conftest import require_data, require_rclpy

from sal_ros.core.calibration import CameraCalibration, read_nuscenes_calib, write_static_extrinsics
from sal_ros.core.errors import CalibrationError
from sal_ros.core.tf import ExtrinsicsSource, StaticExtrinsics
from sal_ros.core.transforms import make_transform, quaternion_to_matrix
from sal_ros.nodes.extrinsics import Tf2Unavailable, make_extrinsics_source


def _calib(name, frame, lidar, yaw):
    R = quaternion_to_matrix([0, 0, np.sin(yaw / 2), np.cos(yaw / 2)])
    return CameraCalibration(name, None, make_transform(R, [yaw, 0, 0]), frame, lidar)


def test_static_lookup_by_frame_and_name():
    calibs = [_calib("front", "front_optical", "lidar", 0.1), _calib("rear", "rear_optical", "lidar", 2.0)]
    source = StaticExtrinsics(calibs)
    assert isinstance(source, ExtrinsicsSource)
    T = source.lookup("rear_optical", "lidar", 123)
    np.testing.assert_array_equal(T, calibs[1].T_cam_lidar)
    np.testing.assert_array_equal(source.lookup("rear", "lidar", 0), T)  # the camera name works too
    assert source.lookup("rear_optical", "other_lidar", 123) is None
    assert source.lookup("side_optical", "lidar", 123) is None
    with pytest.raises(ValueError):
        T[0, 0] = 5.0  # shared with every caller: read-only
    assert source.lookup("front_optical", "lidar", 10**18) is not None  # time-independent


def test_static_from_yaml_and_factory(tmp_path):
    calibs = read_nuscenes_calib(require_data("nuscenes_mini", "calib.json"))
    path = tmp_path / "nus.yaml"
    write_static_extrinsics(path, calibs, lidar_frame_id="LIDAR_TOP")
    for source in (StaticExtrinsics.from_yaml(str(path)), make_extrinsics_source("static", path=str(path)),
                   make_extrinsics_source("static", calibs=calibs)):
        for name, c in calibs.items():
            np.testing.assert_array_equal(source.lookup(name, "LIDAR_TOP", 0), c.T_cam_lidar)


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown extrinsics source"):
        make_extrinsics_source("gps")
    with pytest.raises(ValueError, match="needs calibs or a YAML path"):
        make_extrinsics_source("static")
    with pytest.raises(ValueError, match="needs a node"):
        make_extrinsics_source("tf")
    with pytest.raises(CalibrationError):
        make_extrinsics_source("static", path=str(tmp_path / "missing.yaml"))


def test_tf_without_tf2_ros_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2_ros", None)  # as where no ROS 2 install with tf2_ros is sourced
    with pytest.raises(ImportError, match="calibration.source") as info:
        make_extrinsics_source("tf", node=object())
    assert isinstance(info.value, Tf2Unavailable)


# -------------------------------------------------------------------------------------- with tf2_ros only


@pytest.fixture
def tf_node():
    import tf2_ros  # noqa: F401 - a missing tf2_ros fails here (make setup installs it; on a robot: apt)

    rclpy = require_rclpy()
    rclpy.init()
    node = rclpy.create_node("sal_ros_test_tf")
    yield node
    node.destroy_node()
    rclpy.shutdown()


def _stamped(parent, child, T, stamp_ns):
    from geometry_msgs.msg import TransformStamped

    from sal_ros.core.msgtypes import make_stamp
    from sal_ros.core.transforms import matrix_to_transform_fields
    from sal_ros.nodes.messages import rclpy_types

    (x, y, z), (qx, qy, qz, qw) = matrix_to_transform_fields(T)
    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = parent, child
    msg.header.stamp = make_stamp(stamp_ns, rclpy_types())
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = x, y, z
    msg.transform.rotation.x, msg.transform.rotation.y = qx, qy
    msg.transform.rotation.z, msg.transform.rotation.w = qz, qw
    return msg


def test_tf2_static_chain_is_found_and_cached(tf_node):
    source = make_extrinsics_source("tf", node=tf_node)
    T = make_transform(quaternion_to_matrix([0.5, -0.5, 0.5, -0.5]), [0.1, -0.2, 0.3])
    assert source.lookup("cam_optical", "lidar", 10**18) is None  # nothing yet, and no blocking
    source.buffer.set_transform_static(_stamped("cam_optical", "lidar", T, 0), "test")
    np.testing.assert_allclose(source.lookup("cam_optical", "lidar", 10**18), T, atol=1e-12)
    assert ("cam_optical", "lidar") in source._static


def test_tf2_dynamic_chain_at_the_cloud_stamp(tf_node):
    source = make_extrinsics_source("tf", node=tf_node)
    t0 = 1_700_000_000 * 10**9
    for i, x in enumerate((0.0, 1.0)):
        T = make_transform(np.eye(3), [x, 0, 0])
        source.buffer.set_transform(_stamped("cam_optical", "lidar", T, t0 + i * 10**8), "test")
    np.testing.assert_allclose(source.lookup("cam_optical", "lidar", t0 + 5 * 10**7)[:3, 3], [0.5, 0, 0])
    assert source.lookup("cam_optical", "lidar", t0 + 10**9) is None  # beyond the buffer: not yet known
    latest = make_extrinsics_source("tf", node=tf_node, allow_latest=True)
    latest.buffer.set_transform(_stamped("cam_optical", "lidar", make_transform(np.eye(3), [1, 0, 0]), t0), "t")
    np.testing.assert_allclose(latest.lookup("cam_optical", "lidar", t0 + 10**9)[:3, 3], [1, 0, 0])
    assert ("cam_optical", "lidar") not in source._static and ("cam_optical", "lidar") not in latest._static
    assert ("cam_optical", "lidar") in source.last_error and not latest.last_error
