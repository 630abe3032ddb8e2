"""Rigid transforms: ROS (x, y, z, w) quaternions against transforms3d's (w, x, y, z), and geometry_msgs."""
import math

import numpy as np
import pytest
from transforms3d.quaternions import mat2quat, quat2mat

from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.msgtypes import rosbags_types
from sal_ros.nodes.messages import rclpy_types
from sal_ros.core.transforms import (
    invert_transform,
    is_rigid,
    make_transform,
    matrix_to_quaternion,
    matrix_to_transform_fields,
    quaternion_to_matrix,
    transform_msg_to_matrix,
    transform_points,
)


def _random_quaternions(n=50, seed=0):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_ros_order_against_transforms3d():
    for xyzw in _random_quaternions():
        x, y, z, w = xyzw
        np.testing.assert_allclose(quaternion_to_matrix(xyzw), quat2mat([w, x, y, z]), atol=1e-12)
        R = quat2mat([w, x, y, z])
        back = matrix_to_quaternion(R)
        assert back[3] >= 0
        np.testing.assert_allclose(back, xyzw * np.sign(w), atol=1e-9)  # q and -q are the same rotation
        t3d = mat2quat(R)
        np.testing.assert_allclose(np.abs(back), np.abs([t3d[1], t3d[2], t3d[3], t3d[0]]), atol=1e-9)


def test_known_rotation_in_ros_convention():
    # 90 degrees about +z: x = y = 0, z = sin(45), w = cos(45); maps +x onto +y
    R = quaternion_to_matrix([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    np.testing.assert_allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(matrix_to_quaternion(R), [0, 0, math.sqrt(0.5), math.sqrt(0.5)], atol=1e-12)
    np.testing.assert_array_equal(quaternion_to_matrix([0, 0, 0, 1]), np.eye(3))


def test_unnormalized_and_invalid_quaternions():
    np.testing.assert_allclose(quaternion_to_matrix([0, 0, 2, 2]), quaternion_to_matrix([0, 0, 1, 1]), atol=1e-12)
    with pytest.raises(ValueError, match="norm"):
        quaternion_to_matrix([0, 0, 0, 0])
    with pytest.raises(ValueError, match="norm"):
        quaternion_to_matrix([np.nan, 0, 0, 1])
    with pytest.raises(ValueError, match="4 values"):
        quaternion_to_matrix([0, 0, 1])


def test_make_invert_and_apply():
    rng = np.random.default_rng(1)
    for xyzw in _random_quaternions(10):
        T = make_transform(quaternion_to_matrix(xyzw), rng.normal(size=3) * 5)
        assert is_rigid(T)
        np.testing.assert_allclose(invert_transform(T) @ T, np.eye(4), atol=1e-12)
        np.testing.assert_allclose(invert_transform(T), np.linalg.inv(T), atol=1e-12)
        pts = rng.normal(size=(100, 3)) * 20
        expected = (T @ np.column_stack([pts, np.ones(100)]).T).T[:, :3]
        np.testing.assert_allclose(transform_points(T, pts), expected, atol=1e-10)
        out32 = transform_points(T, pts.astype(np.float32))
        assert out32.dtype == np.float32
        np.testing.assert_allclose(out32, expected, atol=1e-3)


def test_is_rigid_rejects():
    T = make_transform(quaternion_to_matrix([0.1, 0.2, 0.3, 0.9]), [1, 2, 3])
    assert is_rigid(T)
    assert not is_rigid(T @ np.diag([1.01, 1, 1, 1]))  # scale
    assert not is_rigid(np.diag([1.0, 1, -1, 1]))  # reflection
    bad_row = T.copy()
    bad_row[3, 0] = 0.5
    assert not is_rigid(bad_row)
    nan = T.copy()
    nan[0, 3] = np.nan
    assert not is_rigid(nan)
    assert not is_rigid(np.eye(3))
    loose = T.copy()
    loose[:3, :3] *= 1 + 1e-5
    assert not is_rigid(loose) and is_rigid(loose, tol=1e-4)


@pytest.fixture(params=["rclpy", "rosbags"])
def types(request):
    return rclpy_types() if request.param == "rclpy" else rosbags_types()


def _transform_msg(types, translation, xyzw, stamped):
    tf = types.Transform(
        translation=types.Vector3(x=translation[0], y=translation[1], z=translation[2]),
        rotation=types.Quaternion(x=xyzw[0], y=xyzw[1], z=xyzw[2], w=xyzw[3]),
    )
    if not stamped:
        return tf
    return types.TransformStamped(header=types.Header(frame_id="cam_optical"), child_frame_id="velodyne",
                                  transform=tf)


@pytest.mark.parametrize("stamped", [False, True])
def test_messages_round_trip(types, stamped):
    rng = np.random.default_rng(2)
    for xyzw in _random_quaternions(5, seed=3):
        t = rng.normal(size=3)
        T = transform_msg_to_matrix(_transform_msg(types, t, xyzw, stamped))
        np.testing.assert_allclose(T[:3, 3], t, atol=1e-15)
        np.testing.assert_allclose(T[:3, :3], quaternion_to_matrix(xyzw), atol=1e-12)
        translation, rotation = matrix_to_transform_fields(T)
        assert all(type(v) is float for v in translation + rotation)
        again = transform_msg_to_matrix(_transform_msg(types, translation, rotation, stamped))
        np.testing.assert_allclose(again, T, atol=1e-12)


def test_default_message_is_identity_and_bad_ones_raise(types):
    np.testing.assert_array_equal(transform_msg_to_matrix(types.TransformStamped()), np.eye(4))
    with pytest.raises(MalformedMessageError, match="norm"):
        transform_msg_to_matrix(_transform_msg(types, [0, 0, 0], [0, 0, 0, 0], True))
    with pytest.raises(MalformedMessageError, match="translation"):
        transform_msg_to_matrix(_transform_msg(types, [np.inf, 0, 0], [0, 0, 0, 1], False))
    with pytest.raises(MalformedMessageError):
        transform_msg_to_matrix(types.Vector3())
