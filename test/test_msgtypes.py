"""Message-type seam: rosbags factories fill ROS defaults, both backends build the same messages, stamps are exact."""
from __future__ import annotations

import array

import numpy as np
import pytest
from conftest import require_rclpy

from sal_ros.core.msgtypes import make_header, make_stamp, rosbags_types, stamp_to_ns
from sal_ros.nodes.messages import rclpy_types, types_for

NAMES = ["PointCloud2", "PointField", "Image", "CompressedImage", "CameraInfo", "RegionOfInterest", "Header", "Time",
         "TransformStamped", "Transform", "Vector3", "Quaternion"]


@pytest.fixture(params=["rclpy", "rosbags"])
def types(request):
    if request.param == "rclpy":
        require_rclpy()
        return rclpy_types()
    return rosbags_types()


@pytest.mark.parametrize("stamp_ns", [0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789, -1_500_000_000])
def test_stamp_round_trip(types, stamp_ns):
    stamp = make_stamp(stamp_ns, types)
    assert 0 <= stamp.nanosec < 1_000_000_000
    assert stamp_to_ns(stamp) == stamp_ns
    header = make_header("base_link", stamp_ns, types)
    assert header.frame_id == "base_link" and stamp_to_ns(header.stamp) == stamp_ns


def test_every_type_builds_with_defaults_and_constants(types):
    for name in NAMES:
        assert getattr(types, name)() is not None, name
    assert types.PointField.FLOAT32 == 7 and types.PointField.UINT16 == 4
    info = types.CameraInfo(width=640, height=480)
    assert (info.width, info.height, len(info.k), len(info.d)) == (640, 480, 9, 0)
    assert types.Quaternion().w == 1.0  # the IDL default: identity rotation


def test_rosbags_defaults_serialize_and_read_in_rclpy():
    """A rosbags message built from partial kwargs is valid CDR that rclpy reads, and vice versa."""
    ros = rosbags_types()
    info = ros.CameraInfo(header=make_header("cam", 42, ros), width=4, height=3, distortion_model="plumb_bob",
                          d=np.zeros(5))
    raw = bytes(ros.typestore.serialize_cdr(info, info.__msgtype__))
    back = ros.typestore.deserialize_cdr(raw, "sensor_msgs/msg/CameraInfo")
    assert (back.width, back.height, back.distortion_model, back.header.frame_id) == (4, 3, "plumb_bob", "cam")
    require_rclpy()
    from rclpy.serialization import deserialize_message, serialize_message

    rcl = rclpy_types()
    msg = deserialize_message(raw, rcl.CameraInfo)
    assert stamp_to_ns(msg.header.stamp) == 42 and list(msg.d) == [0.0] * 5
    same = rcl.CameraInfo(header=make_header("cam", 42, rcl), width=4, height=3, distortion_model="plumb_bob",
                          d=[0.0] * 5)
    # Not compared byte for byte: rclpy leaves CDR alignment padding uninitialized.
    again = ros.typestore.deserialize_cdr(serialize_message(same), "sensor_msgs/msg/CameraInfo")
    assert (again.width, again.distortion_model, stamp_to_ns(again.header.stamp)) == (4, "plumb_bob", 42)
    np.testing.assert_array_equal(again.k, back.k)


def test_rosbags_factory_rejects_unknown_fields():
    with pytest.raises(TypeError, match="no field"):
        rosbags_types().Header(frame="x")


def test_byte_buffer_is_shared_and_of_the_backend_kind(types):
    data, view = types.byte_buffer(16)
    view[3] = 7
    assert data[3] == 7 and len(data) == 16
    assert isinstance(data, array.array if types.backend == "rclpy" else np.ndarray)
    msg = types.Image(data=types.as_data(b"\x01\x02\x03"))
    assert bytes(msg.data) == b"\x01\x02\x03"
    assert types_for(msg) is types


def test_rosbags_tfmessage_available():
    ros = rosbags_types()
    tf = ros.TFMessage(transforms=[ros.TransformStamped(child_frame_id="velodyne")])
    raw = ros.typestore.serialize_cdr(tf, tf.__msgtype__)
    assert ros.typestore.deserialize_cdr(raw, "tf2_msgs/msg/TFMessage").transforms[0].child_frame_id == "velodyne"
