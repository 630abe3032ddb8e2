"""The rclpy generated message classes as a ``core.msgtypes.MessageTypes``, so core's codecs build rclpy messages.

Core describes the messages and builds them for either backend without importing a message package; the rclpy
classes are loaded here, beside the nodes that publish them (and by the tools and benches that talk to them).
"""
from __future__ import annotations

import functools
from typing import Any

from sal_ros.core.msgtypes import MessageTypes, rosbags_types


@functools.lru_cache(maxsize=1)
def rclpy_types() -> MessageTypes:
    """The rclpy classes (imports sensor_msgs, std_msgs, geometry_msgs on first call; tf2_msgs when installed)."""
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import Quaternion, Transform, TransformStamped, Vector3
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField, RegionOfInterest
    from std_msgs.msg import Header

    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:  # tf2_msgs is not always installed for rclpy
        TFMessage = None
    return MessageTypes(backend="rclpy", PointCloud2=PointCloud2, PointField=PointField, Image=Image,
                        CompressedImage=CompressedImage, CameraInfo=CameraInfo, RegionOfInterest=RegionOfInterest,
                        Header=Header, Time=Time, TransformStamped=TransformStamped, Transform=Transform,
                        Vector3=Vector3, Quaternion=Quaternion, TFMessage=TFMessage)


def types_for(msg: Any) -> MessageTypes:
    """The backend a received message came from: rosbags dataclasses carry ``__msgtype__``."""
    if hasattr(type(msg), "__msgtype__"):
        return rosbags_types()
    return rclpy_types()
