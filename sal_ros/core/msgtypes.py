"""Message classes for either rclpy or rosbags, so core code builds and reads messages without importing rclpy.

``MessageTypes`` holds the classes of one backend: ``sal_ros.nodes.messages.rclpy_types()`` fills it with the
generated ``sensor_msgs.msg`` etc. classes (core never imports a message package); ``rosbags_types(typestore)``
wraps the dataclasses of a rosbags typestore (which need every field as a keyword) in factories that fill
unspecified fields with ROS defaults. Either way ``types.PointCloud2(height=1, ...)`` works, class constants such
as ``types.PointField.FLOAT32`` are reachable, and ``types.byte_buffer(n)`` gives a ``data`` container of the right
kind plus a writable numpy view of it, so encoders write payloads once, without per-element conversion.

Reading is duck-typed: the decoders only touch attributes (``msg.data`` is ``array.array('B')`` for rclpy,
a ``np.uint8`` array for rosbags, or anything exposing the buffer protocol).
"""
from __future__ import annotations

import array
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

NS_PER_S = 1_000_000_000


def image_topic(camera: str) -> str:
    """A camera's default image topic (node parameter camera.<name>.image_topic, bag reader, convert)."""
    return f"/{camera}/image_raw"


def info_topic(camera: str) -> str:
    """A camera's default CameraInfo topic (camera.<name>.info_topic)."""
    return f"/{camera}/camera_info"


# (attribute name, ROS type name); TFMessage is optional (tf2_msgs is not always installed for rclpy).
_MESSAGES = (
    ("PointCloud2", "sensor_msgs/msg/PointCloud2"),
    ("PointField", "sensor_msgs/msg/PointField"),
    ("Image", "sensor_msgs/msg/Image"),
    ("CompressedImage", "sensor_msgs/msg/CompressedImage"),
    ("CameraInfo", "sensor_msgs/msg/CameraInfo"),
    ("RegionOfInterest", "sensor_msgs/msg/RegionOfInterest"),
    ("Header", "std_msgs/msg/Header"),
    ("Time", "builtin_interfaces/msg/Time"),
    ("TransformStamped", "geometry_msgs/msg/TransformStamped"),
    ("Transform", "geometry_msgs/msg/Transform"),
    ("Vector3", "geometry_msgs/msg/Vector3"),
    ("Quaternion", "geometry_msgs/msg/Quaternion"),
    ("TFMessage", "tf2_msgs/msg/TFMessage"),
)


@dataclass(frozen=True)
class MessageTypes:
    """Constructors of the message types sal_ros uses, from one backend ("rclpy" or "rosbags")."""

    backend: str
    PointCloud2: Any
    PointField: Any
    Image: Any
    CompressedImage: Any
    CameraInfo: Any
    RegionOfInterest: Any
    Header: Any
    Time: Any
    TransformStamped: Any
    Transform: Any
    Vector3: Any
    Quaternion: Any
    TFMessage: Any = None  # None when tf2_msgs is unavailable
    typestore: Any = None  # the rosbags typestore (None for rclpy)

    def byte_buffer(self, nbytes: int) -> tuple[Any, np.ndarray]:
        """A zeroed ``uint8[]`` container for ``msg.data`` and a writable uint8 numpy view of the same memory."""
        if self.backend == "rclpy":
            # rclpy's setter accepts array.array('B') as is; anything else is converted element by element.
            buf = array.array("B", [0]) * nbytes if nbytes else array.array("B")
            return buf, np.frombuffer(buf, np.uint8) if nbytes else np.zeros(0, np.uint8)
        buf = np.zeros(nbytes, np.uint8)
        return buf, buf

    def as_data(self, payload: Any) -> Any:
        """``payload`` (bytes, bytearray, numpy array, memoryview) as a ``uint8[]`` value for this backend."""
        raw = np.ascontiguousarray(np.frombuffer(memoryview(payload).cast("B"), np.uint8))
        if self.backend == "rclpy":
            buf = array.array("B")
            buf.frombytes(raw)
            return buf
        return raw.copy() if not raw.flags.writeable else raw


def rosbags_types(typestore: Any = None) -> MessageTypes:
    """Factories for a rosbags typestore (default: ROS 2 Kilted) that accept any subset of fields as kwargs."""
    if typestore is None:
        typestore = _default_typestore()
    return _rosbags_types_cached(typestore)


@functools.lru_cache(maxsize=1)
def _default_typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


@functools.lru_cache(maxsize=8)
def _rosbags_types_cached(typestore: Any) -> MessageTypes:
    classes = {
        attr: (_RosbagsFactory(typestore, name) if name in typestore.types else None) for attr, name in _MESSAGES
    }
    return MessageTypes(backend="rosbags", typestore=typestore, **classes)


class _RosbagsFactory:
    """Calls a rosbags message dataclass with ROS defaults for the fields not given; forwards class constants."""

    def __init__(self, typestore: Any, typename: str) -> None:
        self._typestore = typestore
        self._typename = typename
        self._cls = typestore.types[typename]
        self._fields = typestore.fielddefs[typename][1]

    def __call__(self, **kwargs: Any) -> Any:
        unknown = set(kwargs) - {name for name, _ in self._fields}
        if unknown:
            raise TypeError(f"{self._typename} has no field(s) {sorted(unknown)}")
        for name, desc in self._fields:
            if name not in kwargs:
                kwargs[name] = _IDL_DEFAULTS.get((self._typename, name)) or _default_value(self._typestore, desc)
        return self._cls(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cls, name)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._cls)

    def __repr__(self) -> str:
        return f"<rosbags factory {self._typename}>"


# Non-zero defaults from the .msg/.idl files that rosbags' field definitions do not carry.
_IDL_DEFAULTS = {("geometry_msgs/msg/Quaternion", "w"): 1.0}

_NUMPY_BASE = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
    "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}


def _default_value(typestore: Any, desc: tuple) -> Any:
    """The ROS default for one rosbags field description (zero, "", empty sequence, default sub-message)."""
    from rosbags.typesys.base import Nodetype

    kind, rest = desc
    if kind == Nodetype.NAME:
        return _RosbagsFactory(typestore, rest)()
    if kind == Nodetype.BASE:
        base = rest[0]
        if base == "string" or base == "wstring":
            return ""
        if base == "bool":
            return False
        return 0.0 if base.startswith("float") else 0
    (sub_kind, sub), length = rest
    if sub_kind == Nodetype.BASE and sub[0] in _NUMPY_BASE:
        # rosbags keeps numeric arrays/sequences as numpy arrays.
        return np.zeros(length if kind == Nodetype.ARRAY else 0, _NUMPY_BASE[sub[0]])
    return [_default_value(typestore, (sub_kind, sub)) for _ in range(length if kind == Nodetype.ARRAY else 0)]


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (rclpy or rosbags) -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def make_stamp(stamp_ns: int, types: MessageTypes) -> Any:
    """Integer nanoseconds -> builtin_interfaces/Time (nanosec always in [0, 1e9), as ROS requires)."""
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    return types.Time(sec=sec, nanosec=nanosec)


def make_header(frame_id: str, stamp_ns: int, types: MessageTypes) -> Any:
    return types.Header(stamp=make_stamp(stamp_ns, types), frame_id=str(frame_id))
