"""sensor_msgs/PointCloud2 <-> numpy, vectorized: one structured dtype over ``msg.data``, no per-point Python.

Decoding builds a numpy structured dtype from ``msg.fields`` (offsets, ``itemsize=point_step``, the message's
byte order) and views the buffer as a ``(height, width)`` array with strides ``(row_step, point_step)``. Any valid
layout decodes: all eight PointField datatypes, padding between fields and at the end of a point, ``count > 1``
fields, big-endian data, organized clouds with row padding. ``read_fields`` returns views into ``msg.data``
whenever the layout allows it (little-endian on this host, no row padding), so decoding costs no copy;
``read_xyz`` returns a fresh contiguous ``(N, 3)`` float32 array (what kd-trees and torch want).

Works on rclpy messages and rosbags dataclasses alike (only attributes are read). Anything inconsistent raises
:class:`~sal_ros.core.errors.MalformedMessageError` naming the problem, so nodes can drop the message and go on.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.msgtypes import MessageTypes, make_header

# PointField datatype constant -> numpy type (byte order applied per message).
DATATYPES: dict[int, np.dtype] = {
    1: np.dtype(np.int8),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int16),
    4: np.dtype(np.uint16),
    5: np.dtype(np.int32),
    6: np.dtype(np.uint32),
    7: np.dtype(np.float32),
    8: np.dtype(np.float64),
}
_DATATYPE_OF = {dt: code for code, dt in DATATYPES.items()}

XYZ = ("x", "y", "z")
_XYZ_RECORD = np.dtype("V12")  # x y z as one 12-byte record: one copy per point instead of three strided floats
# Points per block when copying fields between a cloud and columns: a 16k-point block (512 KB at 32 B a point)
# stays in the L2 cache while every field is copied; whole-column passes over a 3.8 MB cloud ran 1.6-1.8x slower.
BLOCK_POINTS = 16_384
# The per-point return strength is "intensity" in every common driver; converted KITTI data may say "reflectance".
INTENSITY_FIELDS = ("intensity", "reflectance")


# ----------------------------------------------------------------------------------------------------- decoding


def point_dtype(msg: Any) -> np.dtype:
    """The validated structured dtype of one point (field offsets, ``itemsize = point_step``, message byte order)."""
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets, extents = [], [], [], []
    for f in msg.fields:
        name, offset, count = str(f.name), int(f.offset), int(f.count)
        base = DATATYPES.get(int(f.datatype))
        if base is None:
            raise MalformedMessageError(f"PointCloud2 field {name!r} has unknown datatype {int(f.datatype)}")
        if not name:
            raise MalformedMessageError("PointCloud2 has a field with an empty name")
        if name in names:
            raise MalformedMessageError(f"PointCloud2 field {name!r} appears twice")
        if count < 1:
            raise MalformedMessageError(f"PointCloud2 field {name!r} has count {count}")
        dt = base.newbyteorder(order)
        names.append(name)
        formats.append(dt if count == 1 else (dt, (count,)))
        offsets.append(offset)
        extents.append((offset, offset + base.itemsize * count, name))
    _check_extents(extents, int(msg.point_step))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": int(msg.point_step)})


def _check_extents(extents: list[tuple[int, int, str]], point_step: int) -> None:
    extents = sorted(extents)
    for start, end, name in extents:
        if end > point_step:
            raise MalformedMessageError(
                f"PointCloud2 field {name!r} (bytes {start}..{end}) extends beyond point_step {point_step}"
            )
    for (_, end, a), (start, _, b) in zip(extents, extents[1:]):
        if start < end:
            raise MalformedMessageError(f"PointCloud2 fields {a!r} and {b!r} overlap")


def _points(msg: Any) -> np.ndarray:
    """The cloud as a (height, width) structured array viewing ``msg.data`` (validated)."""
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    n = height * width
    if n == 0:
        return np.zeros((height, width), _empty_dtype(msg))
    dtype = point_dtype(msg)
    if point_step == 0:
        raise MalformedMessageError(f"PointCloud2 has {n} points but point_step 0")
    if width * point_step > row_step:
        raise MalformedMessageError(
            f"PointCloud2 row_step {row_step} is smaller than width*point_step = {width}*{point_step}"
        )
    buf = _buffer(msg.data)
    if buf.nbytes < height * row_step:
        raise MalformedMessageError(
            f"PointCloud2 data has {buf.nbytes} bytes, height*row_step needs {height}*{row_step} = {height * row_step}"
        )
    return np.ndarray((height, width), dtype, buffer=buf, strides=(row_step, point_step))


def _empty_dtype(msg: Any) -> np.dtype:
    """Dtype for a 0-point cloud: field types only (the layout of no points cannot be wrong)."""
    order = ">" if msg.is_bigendian else "<"
    formats = []
    for f in msg.fields:
        base = DATATYPES.get(int(f.datatype))
        if base is None:
            raise MalformedMessageError(f"PointCloud2 field {f.name!r} has unknown datatype {int(f.datatype)}")
        dt = base.newbyteorder(order)
        formats.append((str(f.name), dt) if int(f.count) <= 1 else (str(f.name), dt, (int(f.count),)))
    return np.dtype(formats)


def _buffer(data: Any) -> np.ndarray:
    """``msg.data`` (array.array, bytes, numpy uint8, memoryview) as a flat uint8 array without copying."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.flags.c_contiguous else np.ascontiguousarray(data).view(np.uint8)
    try:
        return np.frombuffer(data, np.uint8)
    except (TypeError, ValueError):  # a plain list of ints, e.g. from a hand-built message
        return np.asarray(data, np.uint8)


def _native(a: np.ndarray) -> np.ndarray:
    """Big-endian views -> native byte order (a bit-exact byte swap; NaN payloads survive)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def field_names(msg: Any) -> list[str]:
    return [str(f.name) for f in msg.fields]


def read_fields(msg: Any, names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Named fields of a cloud: each ``(height*width,)`` (or ``(N, count)``) in row-major point order.

    Arrays are views into ``msg.data`` when the layout allows (no row padding, native byte order); copy them
    before modifying if the message must stay untouched.
    """
    points = _points(msg)
    available = points.dtype.names or ()
    wanted = available if names is None else tuple(names)
    missing = [name for name in wanted if name not in available]
    if missing:
        raise MalformedMessageError(f"PointCloud2 has no field(s) {missing}; it has {list(available)}")
    n = points.shape[0] * points.shape[1]
    out = {}
    for name in wanted:
        column = points[name]
        out[name] = _native(column.reshape((n,) + column.shape[2:]))
    return out


def read_xyz(msg: Any) -> np.ndarray:
    """``(N, 3)`` float32 contiguous x, y, z (NaN/inf points kept; see :func:`finite_mask`)."""
    return _read_float32(msg, read_fields(msg, XYZ), None)[0]


def _read_float32(msg: Any, fields: dict[str, np.ndarray], name: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Contiguous float32 copies of x y z ``(N, 3)`` and of field ``name`` ``(N,)`` (None without a name), copied
    block by block: the second copy reads the block the first one brought into cache (one pass over the cloud)."""
    for c in XYZ:
        if fields[c].ndim != 1:
            raise MalformedMessageError(f"PointCloud2 field {c!r} has count {fields[c].shape[1]}, expected 1")
    n = fields["x"].shape[0]
    xyz = np.empty((n, 3), np.float32)
    records = _xyz_records(msg, fields)
    if records is not None:
        pairs = [(xyz.view(_XYZ_RECORD).reshape(n), records)]
    else:
        pairs = [(xyz[:, i], fields[c]) for i, c in enumerate(XYZ)]
    extra = None if name is None else np.empty(n, np.float32)
    if extra is not None:
        pairs.append((extra, fields[name]))
    with np.errstate(over="ignore"):  # float64 values beyond float32 range become inf, like NaN points
        _copy_blocks(pairs, n)
    return xyz, extra


def _copy_blocks(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> None:
    """``dst[:] = src`` for every pair, :data:`BLOCK_POINTS` points at a time: each block of a multi-MB cloud stays in
    the L2 cache while every pair reads or writes it, instead of one pass over the whole cloud per pair."""
    for lo in range(0, n, BLOCK_POINTS):
        hi = lo + BLOCK_POINTS
        for dst, src in pairs:
            dst[lo:hi] = src[lo:hi]


def _xyz_records(msg: Any, fields: dict[str, np.ndarray]) -> np.ndarray | None:
    """x y z as one ``(N,)`` view of 12-byte records into ``msg.data`` when they are native float32 side by side
    (the usual driver layout), else None. Copying records is one pass; three float columns were 2.6x slower."""
    x, y, z = (fields[name] for name in XYZ)
    if x.shape[0] == 0 or any(a.dtype != np.float32 or not a.dtype.isnative for a in (x, y, z)):
        return None
    start = x.__array_interface__["data"][0]
    if (y.__array_interface__["data"][0] - start, z.__array_interface__["data"][0] - start) != (4, 8) \
            or not x.strides == y.strides == z.strides:
        return None
    buf = _buffer(msg.data)
    offset, step = start - buf.__array_interface__["data"][0], x.strides[0]
    if offset < 0 or step < 12 or offset + (x.shape[0] - 1) * step + 12 > buf.nbytes:
        return None  # not views into msg.data (e.g. copies of a padded or big-endian cloud)
    return np.ndarray(x.shape, _XYZ_RECORD, buffer=buf, offset=offset, strides=(step,))


def intensity_field(msg: Any) -> str | None:
    names = field_names(msg)
    return next((name for name in INTENSITY_FIELDS if name in names), None)


def read_xyz_intensity(msg: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(N, 3)`` float32 xyz and ``(N,)`` float32 intensity (None when the cloud has no usable intensity field:
    none, or one with ``count != 1``, which :func:`intensity_problem` names). Intensity is optional, so an odd
    one never costs the cloud."""
    name = intensity_field(msg)
    usable = name is not None and not intensity_problem(msg)
    fields = read_fields(msg, XYZ + ((name,) if usable else ()))  # one validated view for both
    return _read_float32(msg, fields, name if usable else None)


def intensity_problem(msg: Any) -> str | None:
    """Why the cloud's intensity field cannot be used (a ``count`` other than 1), or None."""
    name = intensity_field(msg)
    field = next((f for f in msg.fields if str(f.name) == name), None)
    if field is not None and int(field.count) != 1:
        return f"PointCloud2 field {name!r} has count {int(field.count)}, expected 1: intensity ignored"
    return None


def finite_mask(xyz: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: points whose x, y and z are all finite (clouds with ``is_dense=False`` carry NaN/inf)."""
    return np.isfinite(xyz).all(axis=1)


# ----------------------------------------------------------------------------------------------------- encoding


def encode_cloud(
    fields: Mapping[str, np.ndarray], frame_id: str, stamp_ns: int, types: MessageTypes
) -> Any:
    """A dense (height 1), little-endian PointCloud2 holding ``fields`` in the given order, in a fresh buffer.

    Each value is ``(N,)`` or ``(N, count)`` of a PointField type (int8..uint32, float32, float64; bool is
    stored as uint8) and keeps its dtype. Two conveniences: ``"xyz"`` ``(N, 3)`` becomes float32 ``x, y, z``;
    ``"rgb"`` given as ``(N, 3)`` uint8 is packed into the float32 ROS convention (see :func:`pack_rgb`).
    Fields are aligned to their size and ``point_step`` to the largest one, as PCL does. ``is_dense`` is
    set from whether x, y, z are all finite. :class:`CloudEncoder` does the same into a reused buffer.
    """
    return CloudEncoder(types, reuse=False).encode(fields, frame_id, stamp_ns)


class CloudEncoder:
    """:func:`encode_cloud` for a publisher: with rclpy messages the ``data`` buffer is reused from cloud to cloud
    (resized in place when the point count changes), so a frame costs no fresh multi-MB allocation and its page
    faults. The message returned shares that buffer: it is valid until the next ``encode``, so publish it first.
    That is safe because rclpy's ``Publisher.publish`` converts the message into a C message (the generated
    ``convert_from_py`` copies ``data`` through the buffer protocol) and destroys that copy after ``rcl_publish``
    returns: nothing keeps the Python buffer once ``publish`` returns."""

    def __init__(self, types: MessageTypes, reuse: bool = True) -> None:
        self._types = types
        self._reuse = reuse and types.backend == "rclpy"
        self._data: Any = None
        self._dtype: np.dtype | None = None

    def encode(self, fields: Mapping[str, np.ndarray], frame_id: str, stamp_ns: int) -> Any:
        xyz = _xyz_block(fields)
        if xyz is not None:
            fields = {**fields, "xyz": xyz}  # converted once; its x y z columns are views of it
        columns = _columns(fields)
        n = _common_length(columns)
        dtype, layout = _packed_layout(columns)
        data, raw = self._buffer(dtype, n)
        _pack(raw, dtype, columns, xyz)
        types = self._types
        msg = types.PointCloud2(
            header=make_header(frame_id, stamp_ns, types),
            height=1,
            width=n,
            fields=[types.PointField(name=nm, offset=off, datatype=code, count=count)
                    for nm, off, code, count in layout],
            is_bigendian=False,
            point_step=dtype.itemsize,
            row_step=dtype.itemsize * n,
            is_dense=_all_finite(columns, xyz),
            **_keeps_data(types),
        )
        msg.data = data  # after construction: the constructor copies, the checking setter keeps an array('B')
        return msg

    def _buffer(self, dtype: np.dtype, n: int) -> tuple[Any, np.ndarray]:
        """The data container for ``n`` points of ``dtype`` and a uint8 view; padding bytes are zero, since a
        buffer is only reused for the same point layout and fields never write into padding."""
        nbytes = n * dtype.itemsize
        if not self._reuse or nbytes == 0:
            return self._types.byte_buffer(nbytes)
        if self._data is None or dtype != self._dtype or not _resize(self._data, nbytes):
            self._data, _ = self._types.byte_buffer(nbytes)
            self._dtype = dtype
        return self._data, np.frombuffer(self._data, np.uint8)


def _keeps_data(types: MessageTypes) -> dict[str, bool]:
    """Constructor arguments under which the message's ``data`` setter keeps an ``array('B')`` as is: rclpy
    messages generated with ``check_fields`` copy it unless checking is on (a 3.8 MB copy per cloud); older
    generated code always keeps it."""
    return {"check_fields": True} if "_check_fields" in getattr(types.PointCloud2, "__slots__", ()) else {}


def _resize(data: Any, nbytes: int) -> bool:
    """Resize an ``array('B')`` in place (new bytes zero); False when something still views it (then it is left
    to that holder and the caller takes a new one)."""
    try:
        if nbytes < len(data):
            del data[nbytes:]
        elif nbytes > len(data):
            data.frombytes(bytes(nbytes - len(data)))
    except BufferError:
        return False
    return True


def _xyz_block(fields: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The ``"xyz"`` input as one C-contiguous float32 ``(N, 3)`` array, or None without one."""
    if "xyz" not in fields:
        return None
    return np.ascontiguousarray(np.asarray(fields["xyz"]).reshape(-1, 3), np.float32)


def _pack(raw: np.ndarray, dtype: np.dtype, columns: dict[str, np.ndarray], xyz: np.ndarray | None) -> None:
    """Write every column into its field of the packed buffer, :data:`BLOCK_POINTS` points at a time."""
    n = raw.nbytes // dtype.itemsize if dtype.itemsize else 0
    if n == 0:
        return
    points = raw.view(dtype)
    as_records = xyz is not None and sys.byteorder == "little"  # the records are copied byte for byte
    pairs = [(points[name], values) for name, values in columns.items() if not as_records or name not in XYZ]
    if as_records:  # _packed_layout puts x y z side by side, 4-byte aligned
        records = np.ndarray((n,), _XYZ_RECORD, buffer=raw, offset=dtype.fields["x"][1], strides=(dtype.itemsize,))
        pairs.append((records, xyz.view(_XYZ_RECORD).reshape(n)))
    _copy_blocks(pairs, n)


def _all_finite(columns: dict[str, np.ndarray], xyz: np.ndarray | None) -> bool:
    if xyz is not None:
        return bool(np.isfinite(xyz).all())
    return all(bool(np.isfinite(columns[c]).all()) for c in XYZ if c in columns and columns[c].dtype.kind == "f")


def _columns(fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name, values in fields.items():
        values = np.asarray(values)
        if name == "xyz":
            xyz = values.astype(np.float32, copy=False).reshape(-1, 3)
            columns.update(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2])
            continue
        if name == "rgb" and values.ndim == 2 and values.shape[1] == 3 and values.dtype == np.uint8:
            values = pack_rgb(values)
        if values.dtype == np.bool_:
            values = values.view(np.uint8)
        if values.dtype.newbyteorder("=") not in _DATATYPE_OF:
            raise ValueError(f"field {name!r}: dtype {values.dtype} has no PointField datatype; cast it first")
        if values.ndim not in (1, 2):
            raise ValueError(f"field {name!r}: expected (N,) or (N, count), got shape {values.shape}")
        columns[name] = values
    return columns


def _common_length(columns: dict[str, np.ndarray]) -> int:
    lengths = {name: values.shape[0] for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"fields have different numbers of points: {lengths}")
    return next(iter(lengths.values()), 0)


def _packed_layout(columns: dict[str, np.ndarray]) -> tuple[np.dtype, list[tuple[str, int, int, int]]]:
    """Little-endian structured dtype with naturally aligned fields, and the (name, offset, datatype, count) list."""
    names, formats, offsets, layout = [], [], [], []
    offset, align = 0, 1
    for name, values in columns.items():
        base = values.dtype.newbyteorder("=")
        count = 1 if values.ndim == 1 else values.shape[1]
        offset = -(-offset // base.itemsize) * base.itemsize
        dt = base.newbyteorder("<")
        names.append(name)
        formats.append(dt if values.ndim == 1 else (dt, (count,)))
        offsets.append(offset)
        layout.append((name, offset, _DATATYPE_OF[base], count))
        offset += base.itemsize * count
        align = max(align, base.itemsize)
    itemsize = -(-offset // align) * align
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}), layout


# ---------------------------------------------------------------------------------------------------------- rgb


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(N, 3)`` uint8 RGB -> ``(N,)`` float32 whose bits are ``0x00RRGGBB`` (the PCL/RViz ``rgb`` field)."""
    rgb = np.asarray(rgb, np.uint8).reshape(-1, 3).astype(np.uint32)
    return ((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """``(N,)`` packed ``rgb``/``rgba`` (float32 or uint32 bits) -> ``(N, 3)`` uint8 RGB."""
    bits = np.ascontiguousarray(packed).view(np.uint32).reshape(-1)
    return np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=1).astype(np.uint8)
