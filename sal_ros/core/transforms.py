"""Rigid transforms as 4x4 float64 matrices, and their ROS message form.

Quaternions here are always in ROS order (x, y, z, w). transforms3d, which does the rotation math
(tf_transformations wraps it too), uses (w, x, y, z): the reordering happens only in this module.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from transforms3d.quaternions import mat2quat, quat2mat

from sal_ros.core.errors import MalformedMessageError


def quaternion_to_matrix(xyzw: Any) -> np.ndarray:
    """(x, y, z, w) -> 3x3 rotation matrix; the quaternion is normalized, a zero or non-finite one is an error."""
    q = np.asarray(xyzw, dtype=np.float64).reshape(-1)
    if q.size != 4:
        raise ValueError(f"quaternion must have 4 values (x, y, z, w), got {q.size}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"quaternion {q.tolist()} (x, y, z, w) has no usable norm")
    x, y, z, w = q / norm
    return quat2mat([w, x, y, z])


def matrix_to_quaternion(R: Any) -> np.ndarray:
    """3x3 rotation matrix (or the rotation part of a 4x4) -> unit quaternion (x, y, z, w) with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    w, x, y, z = mat2quat(R[:3, :3])
    q = np.array([x, y, z, w])
    return -q if w < 0 else q


def make_transform(R: Any, t: Any) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64).reshape(3, 3)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def invert_transform(T: Any) -> np.ndarray:
    """Inverse of a rigid transform (transpose of the rotation, no general matrix inverse)."""
    T = np.asarray(T, dtype=np.float64)
    R_inv = T[:3, :3].T
    return make_transform(R_inv, -R_inv @ T[:3, 3])


def transform_points(T: Any, points: Any) -> np.ndarray:
    """Apply T to (N, 3) points; computed in float64, returned in the points' float dtype (float32 stays)."""
    pts = np.asarray(points)
    T = np.asarray(T, dtype=np.float64)
    out = pts.astype(np.float64, copy=False).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    return out.astype(pts.dtype if np.issubdtype(pts.dtype, np.floating) else np.float64, copy=False)


def transform_msg_to_matrix(msg: Any) -> np.ndarray:
    """geometry_msgs Transform or TransformStamped (rclpy or rosbags) -> 4x4.

    For a TransformStamped from ``header.frame_id`` (parent) to ``child_frame_id`` the matrix maps child
    coordinates into the parent frame; tf2's ``lookup_transform(target, source)`` result maps source into target.
    """
    tf = getattr(msg, "transform", msg)
    try:
        t, q = tf.translation, tf.rotation
        R = quaternion_to_matrix([q.x, q.y, q.z, q.w])
        translation = [float(t.x), float(t.y), float(t.z)]
    except (AttributeError, ValueError) as exc:
        raise MalformedMessageError(f"Transform: {exc}") from exc
    if not np.all(np.isfinite(translation)):
        raise MalformedMessageError(f"Transform: non-finite translation {translation}")
    return make_transform(R, translation)


def matrix_to_transform_fields(T: Any) -> tuple[tuple[float, float, float], tuple[float, float, float, float]]:
    """4x4 -> (translation (x, y, z), rotation (x, y, z, w)) as plain floats, for building a Transform message."""
    T = np.asarray(T, dtype=np.float64)
    x, y, z = (float(v) for v in T[:3, 3])
    qx, qy, qz, qw = (float(v) for v in matrix_to_quaternion(T[:3, :3]))
    return (x, y, z), (qx, qy, qz, qw)


def is_rigid(T: Any, tol: float = 1e-6) -> bool:
    """True for a finite 4x4 with an orthonormal, right-handed rotation and last row [0, 0, 0, 1]."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3]
    return bool(
        np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=tol)
        and np.allclose(R.T @ R, np.eye(3), rtol=0.0, atol=tol)
        and abs(np.linalg.det(R) - 1.0) <= tol
    )
