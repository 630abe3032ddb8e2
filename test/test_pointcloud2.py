"""PointCloud2 codec: bit-exact round trips for every datatype and layout, through rclpy and rosbags (and across
the two via CDR bytes), against an independent per-point struct reference; malformed clouds raise clearly."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import require_data, require_rclpy

from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.msgtypes import rosbags_types, stamp_to_ns
from sal_ros.nodes.messages import rclpy_types
from sal_ros.core.pointcloud2 import (
    encode_cloud,
    finite_mask,
    pack_rgb,
    read_fields,
    read_xyz,
    read_xyz_intensity,
    unpack_rgb,
)

# PointField datatype -> (numpy dtype, struct code of an unsigned int of the same size: floats are written by bits)
DT = {1: ("i1", "B"), 2: ("u1", "B"), 3: ("i2", "H"), 4: ("u2", "H"), 5: ("i4", "I"), 6: ("u4", "I"),
      7: ("f4", "I"), 8: ("f8", "Q")}
UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of an array (native order), so NaN payloads compare exactly."""
    a = np.asarray(a)
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="))).view(UINT_OF_SIZE[a.dtype.itemsize])


# --------------------------------------------------------------------------- backends and transports


def _rclpy():
    require_rclpy()
    return rclpy_types()


BACKENDS = {"rclpy": _rclpy, "rosbags": rosbags_types}


@pytest.fixture(params=sorted(BACKENDS))
def types(request):
    return BACKENDS[request.param]()


def via_cdr(msg, types, to: str):
    """Serialize with the message's own library, deserialize with ``to`` ("rclpy" or "rosbags")."""
    if types.backend == "rclpy":
        from rclpy.serialization import serialize_message

        raw = serialize_message(msg)
    else:
        raw = bytes(types.typestore.serialize_cdr(msg, msg.__msgtype__))
    if to == "rclpy":
        from rclpy.serialization import deserialize_message

        return deserialize_message(raw, _rclpy().PointCloud2)
    return rosbags_types().typestore.deserialize_cdr(raw, "sensor_msgs/msg/PointCloud2")


TRANSPORTS = ["same", "rclpy", "rosbags"]


def transport(msg, types, how: str):
    if how == "same":
        return msg
    if how == "rclpy":
        require_rclpy()
    return via_cdr(msg, types, how)


# --------------------------------------------------------------------------- independent reference encoder


def build_cloud(types, spec, *, height, width, point_step, row_step, bigendian=False, seed=0, special=None):
    """A cloud written point by point with struct (not numpy), random bit patterns in every field.

    ``spec``: [(name, offset, datatype, count)]. Padding bytes are 0xAB so reading them would show.
    Returns the message and the expected {name: (N,) or (N, count)} arrays in native order.
    """
    rng = np.random.default_rng(seed)
    n = height * width
    order = ">" if bigendian else "<"
    expected = {}
    for name, _, datatype, count in spec:
        dtype = np.dtype(DT[datatype][0])
        raw = rng.integers(0, 256, size=n * count * dtype.itemsize, dtype=np.uint8)
        values = raw.view(dtype).reshape(n, count) if count > 1 else raw.view(dtype)
        if special and name in special:
            values[: len(special[name])] = special[name]
        expected[name] = values
    data = bytearray(b"\xab" * (height * row_step))
    for name, offset, datatype, count in spec:
        dtype = np.dtype(DT[datatype][0])
        as_uint = expected[name].view(UINT_OF_SIZE[dtype.itemsize]).reshape(n, count)
        for i in range(n):
            base = (i // width) * row_step + (i % width) * point_step + offset
            for k in range(count):
                struct.pack_into(order + DT[datatype][1], data, base + k * dtype.itemsize, int(as_uint[i, k]))
    fields = [types.PointField(name=nm, offset=off, datatype=dt, count=c) for nm, off, dt, c in spec]
    msg = types.PointCloud2(
        height=height, width=width, fields=fields, is_bigendian=bigendian, point_step=point_step,
        row_step=row_step, data=types.as_data(bytes(data)), is_dense=False,
    )
    return msg, expected


ALL_TYPES = [(f"f{dt}", 4 * (dt - 1) * 2, dt, 1) for dt in range(1, 9)]  # one field per datatype, 8 bytes apart

LAYOUTS = {
    # every datatype, each at an offset aligned to 8, padding between them
    "all_datatypes": dict(spec=ALL_TYPES, height=1, width=23, point_step=64, row_step=64 * 23),
    "all_datatypes_bigendian": dict(spec=ALL_TYPES, height=1, width=23, point_step=64, row_step=64 * 23,
                                    bigendian=True),
    # fields listed out of offset order, unaligned offsets, a large tail padding (point_step > fields)
    "odd_offsets": dict(
        spec=[("intensity", 13, 7, 1), ("x", 1, 7, 1), ("y", 5, 7, 1), ("z", 9, 7, 1), ("ring", 17, 4, 1),
              ("t", 20, 8, 1)],
        height=1, width=17, point_step=48, row_step=48 * 17),
    # count > 1 fields
    "counts": dict(
        spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("normal", 12, 7, 3), ("rgba", 24, 2, 4),
              ("hist", 28, 3, 5)],
        height=1, width=11, point_step=40, row_step=40 * 11),
    # organized cloud with row padding, big-endian, doubles
    "organized_row_padding_bigendian": dict(
        spec=[("x", 0, 8, 1), ("y", 8, 8, 1), ("z", 16, 8, 1), ("intensity", 24, 4, 1), ("ring", 26, 2, 1)],
        height=4, width=5, point_step=32, row_step=32 * 5 + 24, bigendian=True),
    "organized_row_padding": dict(
        spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("intensity", 16, 7, 1)],
        height=6, width=7, point_step=32, row_step=32 * 7 + 8),
    "organized_no_padding": dict(
        spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("intensity", 12, 7, 1)],
        height=3, width=8, point_step=16, row_step=16 * 8),
}


@pytest.mark.parametrize("how", TRANSPORTS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_decode_matches_struct_reference_bit_exact(types, layout, how):
    msg, expected = build_cloud(types, **LAYOUTS[layout])
    got = read_fields(transport(msg, types, how))
    assert list(got) == [name for name, *_ in LAYOUTS[layout]["spec"]]
    for name, values in expected.items():
        assert got[name].dtype == values.dtype and got[name].dtype.isnative, name
        assert got[name].shape == values.shape, name
        np.testing.assert_array_equal(bits(got[name]), bits(values), err_msg=name)


@pytest.mark.parametrize("bigendian", [False, True])
def test_nan_inf_payloads_survive_bit_exact(types, bigendian):
    patterns = np.array([0x7FC00000, 0x7FA00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001],
                        np.uint32).view(np.float32)
    spec = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("d", 16, 8, 1)]
    dnan = np.array([0x7FF0000000000001, 0xFFF8DEADBEEF0000], np.uint64).view(np.float64)
    msg, expected = build_cloud(types, spec, height=1, width=12, point_step=24, row_step=24 * 12,
                                bigendian=bigendian, special={"x": patterns, "y": patterns[::-1], "d": dnan})
    for how in TRANSPORTS:
        got = read_fields(transport(msg, types, how))
        for name in ("x", "y", "d"):
            np.testing.assert_array_equal(bits(got[name]), bits(expected[name]), err_msg=f"{how} {name}")
    xyz = read_xyz(msg)
    np.testing.assert_array_equal(bits(xyz[:, 0]), bits(expected["x"]))
    np.testing.assert_array_equal(finite_mask(xyz), np.isfinite(np.stack([expected[c] for c in "xyz"], 1)).all(1))
    assert not finite_mask(xyz)[:5].any()


def test_read_fields_are_views_when_layout_allows(types):
    msg, _ = build_cloud(types, **LAYOUTS["organized_no_padding"])
    x = read_fields(msg, ["x"])["x"]
    assert not x.flags.owndata and np.shares_memory(x, np.frombuffer(msg.data, np.uint8))


def test_read_xyz_intensity_casts_and_reports_missing_intensity(types):
    msg, expected = build_cloud(types, **LAYOUTS["organized_row_padding_bigendian"])
    xyz, intensity = read_xyz_intensity(msg)
    assert xyz.dtype == np.float32 and xyz.shape == (20, 3) and xyz.flags.c_contiguous
    with np.errstate(over="ignore"):
        reference = np.stack([expected[c].astype(np.float32) for c in "xyz"], 1)
    np.testing.assert_array_equal(xyz, reference)
    np.testing.assert_array_equal(intensity, expected["intensity"].astype(np.float32))
    no_i, _ = build_cloud(types, spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1)], height=1, width=3,
                          point_step=12, row_step=36)
    assert read_xyz_intensity(no_i)[1] is None


def test_empty_cloud_decodes_to_empty_arrays(types):
    msg, _ = build_cloud(types, spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("n", 12, 7, 3)],
                         height=1, width=0, point_step=24, row_step=0)
    for how in TRANSPORTS:
        fields = read_fields(transport(msg, types, how))
        assert fields["x"].shape == (0,) and fields["n"].shape == (0, 3)
        xyz, intensity = read_xyz_intensity(transport(msg, types, how))
        assert xyz.shape == (0, 3) and xyz.dtype == np.float32 and intensity is None
    empty = encode_cloud({"xyz": np.zeros((0, 3)), "label": np.zeros(0, np.uint16)}, "lidar", 0, types)
    assert empty.width == 0 and read_xyz(empty).shape == (0, 3)


# --------------------------------------------------------------------------- encoder


def random_fields(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    fields = {}
    for dt, (code, _) in DT.items():
        dtype = np.dtype(code)
        fields[f"f{dt}"] = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8).view(dtype)
    fields["vec"] = rng.normal(size=(n, 3)).astype(np.float64)
    return fields


@pytest.mark.parametrize("how", TRANSPORTS)
def test_encode_round_trip_every_datatype_bit_exact(types, how):
    xyz = np.random.default_rng(1).normal(size=(57, 3)).astype(np.float32)
    fields = {"xyz": xyz, **random_fields(57)}
    msg = encode_cloud(fields, "velodyne", 1_700_000_000_123_456_789, types)
    assert msg.height == 1 and not msg.is_bigendian and msg.row_step == msg.point_step * 57
    assert msg.is_dense
    got = read_fields(transport(msg, types, how))
    assert list(got) == ["x", "y", "z", *[f"f{dt}" for dt in DT], "vec"]
    np.testing.assert_array_equal(bits(np.stack([got[c] for c in "xyz"], 1)), bits(xyz))
    for name in fields:
        if name != "xyz":
            assert got[name].dtype == fields[name].dtype
            np.testing.assert_array_equal(bits(got[name]), bits(fields[name]), err_msg=name)
    decoded = transport(msg, types, how)
    assert stamp_to_ns(decoded.header.stamp) == 1_700_000_000_123_456_789
    assert decoded.header.frame_id == "velodyne"


def test_encoded_layout_is_aligned_and_readable_by_struct_reference(types):
    """The encoder's offsets are checked against point-by-point struct reads of the raw bytes."""
    rng = np.random.default_rng(2)
    n = 9
    fields = {
        "x": rng.normal(size=n).astype(np.float32), "y": rng.normal(size=n).astype(np.float32),
        "z": rng.normal(size=n).astype(np.float32), "intensity": rng.random(n).astype(np.float32),
        "label": rng.integers(0, 2**16, n).astype(np.uint16), "instance": rng.integers(0, 2**32, n, np.uint32),
        "score": rng.random(n).astype(np.float32), "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
    }
    msg = encode_cloud(fields, "lidar", 5, types)
    layout = {f.name: (f.offset, f.datatype, f.count) for f in msg.fields}
    assert layout == {"x": (0, 7, 1), "y": (4, 7, 1), "z": (8, 7, 1), "intensity": (12, 7, 1), "label": (16, 4, 1),
                      "instance": (20, 6, 1), "score": (24, 7, 1), "rgb": (28, 7, 1)}
    assert msg.point_step == 32
    raw = bytes(msg.data)
    for i in range(n):
        base = i * msg.point_step
        assert struct.unpack_from("<H", raw, base + 16)[0] == fields["label"][i]
        assert struct.unpack_from("<I", raw, base + 20)[0] == fields["instance"][i]
        assert struct.unpack_from("<f", raw, base + 12)[0] == fields["intensity"][i]
        r, g, b = fields["rgb"][i]
        assert struct.unpack_from("<I", raw, base + 28)[0] == (int(r) << 16) | (int(g) << 8) | int(b)
    np.testing.assert_array_equal(unpack_rgb(read_fields(msg, ["rgb"])["rgb"]), fields["rgb"])


def test_encode_marks_non_dense_and_rejects_bad_fields(types):
    xyz = np.ones((4, 3), np.float32)
    xyz[2, 1] = np.nan
    assert not encode_cloud({"xyz": xyz}, "l", 0, types).is_dense
    with pytest.raises(ValueError, match="int64"):
        encode_cloud({"xyz": xyz, "id": np.arange(4)}, "l", 0, types)
    with pytest.raises(ValueError, match="different numbers of points"):
        encode_cloud({"xyz": xyz, "label": np.zeros(3, np.uint16)}, "l", 0, types)


def test_pack_unpack_rgb_round_trip_and_ros_convention():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], np.uint8)
    packed = pack_rgb(rgb)
    assert packed.dtype == np.float32
    np.testing.assert_array_equal(packed.view(np.uint32), [0xFF0000, 0x00FF00, 0x0000FF, 0x010203])
    np.testing.assert_array_equal(unpack_rgb(packed), rgb)
    np.testing.assert_array_equal(unpack_rgb(packed.view(np.uint32) | np.uint32(0xFF000000)), rgb)  # rgba


def test_semantickitti_scan_round_trip(types):
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    scan = np.fromfile(path, np.float32).reshape(-1, 4)
    assert scan.shape == (124_668, 4)
    msg = encode_cloud({"xyz": scan[:, :3], "intensity": scan[:, 3]}, "velodyne", 0, types)
    for how in TRANSPORTS:
        xyz, intensity = read_xyz_intensity(transport(msg, types, how))
        np.testing.assert_array_equal(bits(xyz), bits(scan[:, :3]))
        np.testing.assert_array_equal(bits(intensity), bits(scan[:, 3]))


# --------------------------------------------------------------------------- malformed clouds

GOOD = dict(spec=[("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1)], height=2, width=3, point_step=16, row_step=48)


def malformed(types, change: dict, data_len: int | None = None, fields=None):
    msg, _ = build_cloud(types, **GOOD)
    for key, value in change.items():
        setattr(msg, key, value)
    if fields is not None:
        msg.fields = [types.PointField(name=nm, offset=off, datatype=dt, count=c) for nm, off, dt, c in fields]
    if data_len is not None:
        msg.data = types.as_data(bytes(msg.data)[:data_len])
    return msg


MALFORMED = {
    "data shorter than height*row_step": (dict(), 95, None, "data has 95 bytes"),
    "row_step below width*point_step": (dict(row_step=40), None, None, "row_step 40"),
    "missing z": (dict(), None, [("x", 0, 7, 1), ("y", 4, 7, 1)], "no field"),
    "overlapping fields": (dict(), None, [("x", 0, 7, 1), ("y", 2, 7, 1), ("z", 8, 7, 1)], "overlap"),
    "field beyond point_step": (dict(), None, [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 8, 2)], "beyond point_step"),
    "unknown datatype": (dict(), None, [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 9, 1)], "unknown datatype 9"),
    "zero point_step with points": (dict(point_step=0), None, None, "point_step"),
    "duplicate field": (dict(), None, [("x", 0, 7, 1), ("y", 4, 7, 1), ("x", 8, 7, 1)], "twice"),
    "zero count": (dict(), None, [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 0)], "count 0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_cloud_raises_naming_the_problem(types, case):
    change, data_len, fields, text = MALFORMED[case]
    msg = malformed(types, change, data_len, fields)
    with pytest.raises(MalformedMessageError, match=text):
        read_xyz_intensity(msg)


def test_malformed_is_a_value_error_family_member(types):
    from sal_ros.core.errors import SensorDataError

    msg = malformed(types, dict(row_step=8))
    with pytest.raises(SensorDataError):
        read_fields(msg)


def test_bench_codec_runs_and_checks_itself_against_the_reference(capsys):
    """Small run of `sal-ros bench codec`: it asserts numpy and struct reference agree before timing."""
    import argparse
    import json

    from sal_ros.bench import codec

    parser = argparse.ArgumentParser()
    codec.add_arguments(parser)
    assert codec.main(parser.parse_args(["--points", "3000", "--repeats", "3", "--reference-repeats", "1"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["points"] == 3000
    for part in ("decode", "encode"):
        assert result[part]["median_ms"] > 0 and result[part]["reference_median_ms"] > 0
        assert result[part]["speedup"] == pytest.approx(
            result[part]["reference_median_ms"] / result[part]["median_ms"], rel=0.05)
