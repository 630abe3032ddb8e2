"""The ROS 2 Python packages as references for our own code:

- sensor_msgs_py (point_cloud2) for the PointCloud2 codec on the real KITTI scan: bytes and arrays identical where
  it is right; where it is wrong (organized clouds with row padding: it ignores row_step; big-endian data: it
  byte-swaps the message's own buffer in place, so a second read of the same message is garbage) the test shows
  it and shows ours right.
- message_filters' ApproximateTimeSynchronizer beside our lidar-anchored synchronizer on one message sequence
  (per-camera offsets, a missing camera image, a stray image): the numbers of docs/ros.md.
- tf_transformations for the quaternion and matrix helpers of sal_ros.core.transforms.

These three come from the ROS 2 tooling bundle (apt on a robot; built from ../shared/ros2 by `make setup` here), so
they are imported per test: without one, the tests that use it fail and the rest of the suite still runs (an import
at module level stops the collection of every test file)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from conftest import require_data, require_rclpy

rclpy = require_rclpy()
from sensor_msgs.msg import Image, PointCloud2, PointField  # noqa: E402

from sal_ros.core.msgtypes import make_header  # noqa: E402
from sal_ros.nodes.messages import rclpy_types  # noqa: E402
from sal_ros.core.pointcloud2 import encode_cloud, read_fields  # noqa: E402
from sal_ros.core.sync import LidarAnchoredSynchronizer  # noqa: E402
from sal_ros.core.transforms import make_transform, matrix_to_quaternion, quaternion_to_matrix  # noqa: E402

MS = 1_000_000
T0 = 1_700_000_000_000_000_000
# Python packages of the ROS 2 tooling bundle and the interfaces `make setup` builds: no test imports them at
# module level.
BUILT_BY_SETUP = ("message_filters", "tf_transformations", "sensor_msgs_py", "tf2_ros", "tf2_py", "tf2_msgs",
                  "launch", "launch_ros", "ros2cli", "rosidl_runtime_py", "vision_msgs", "sal_ros_msgs")


def bundle(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not importable: the ROS 2 tooling bundle is missing or broken (`make setup` builds "
                    f"it from ../shared/ros2; on a robot: apt): {exc}")


@pytest.fixture
def smp():
    return bundle("sensor_msgs_py.point_cloud2")


@pytest.fixture
def tf_transformations():
    return bundle("tf_transformations")


@pytest.fixture
def message_filters():
    return bundle("message_filters")


def test_no_test_module_imports_the_bundle_at_module_level():
    """A missing bundle fails the tests that need it, never the collection of the whole suite."""
    found = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:  # statements run at collection (not in functions)
            for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
                names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else \
                    [inner.module or ""] if isinstance(inner, ast.ImportFrom) else []
                found += [f"{path.name}:{inner.lineno} {n}" for n in names if n.split(".")[0] in BUILT_BY_SETUP]
    assert not found, found


@pytest.fixture(scope="module")
def scan():
    seq = require_data("semantickitti", "sequences", "00")
    return np.fromfile(seq / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)


# ---------------------------------------------------------------------------------------- sensor_msgs_py


def test_encode_is_byte_identical_to_sensor_msgs_py_create_cloud(scan, smp):
    fields = {"xyz": scan[:, :3], "intensity": scan[:, 3]}
    ours = encode_cloud(fields, "velodyne", T0, rclpy_types())
    reference = smp.create_cloud(ours.header, ours.fields, scan)
    assert [(f.name, f.offset, f.datatype, f.count) for f in ours.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in reference.fields]
    assert (ours.height, ours.width, ours.point_step, ours.row_step, ours.is_bigendian) == \
        (reference.height, reference.width, reference.point_step, reference.row_step, reference.is_bigendian)
    assert bytes(ours.data) == bytes(reference.data) and len(ours.data) == 124668 * 16


def test_decode_matches_sensor_msgs_py_read_points_on_the_real_scan(scan, smp):
    xyzi = ["x", "y", "z", "intensity"]
    cloud = smp.create_cloud(make_header("velodyne", T0, rclpy_types()),
                             [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                              for i, n in enumerate(xyzi)], scan)
    reference = smp.read_points_numpy(cloud, field_names=xyzi)
    ours = read_fields(cloud, xyzi)
    for i, name in enumerate(xyzi):
        assert np.array_equal(ours[name], reference[:, i]) and np.array_equal(ours[name], scan[:, i])


def _organized_with_row_padding(scan, width=64, pad=12):
    """A 2-row organized cloud whose rows end in `pad` bytes of padding (row_step > width * point_step), as
    some drivers lay out their buffers."""
    rows = scan[: 2 * width].reshape(2, width, 4)
    data = b"".join(row.tobytes() + b"\xab" * pad for row in rows)
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, n in enumerate(["x", "y", "z", "intensity"])]
    return PointCloud2(header=make_header("velodyne", T0, rclpy_types()), height=2, width=width, fields=fields,
                       is_bigendian=False, point_step=16, row_step=width * 16 + pad, data=data, is_dense=True), rows


def test_row_padding_sensor_msgs_py_reads_the_padding_ours_skips_it(scan, smp):
    cloud, rows = _organized_with_row_padding(scan)
    expected = rows.reshape(-1, 4)
    ours = read_fields(cloud, ["x", "intensity"])
    assert np.array_equal(ours["x"], expected[:, 0]) and np.array_equal(ours["intensity"], expected[:, 3])
    reference = smp.read_points_numpy(cloud, field_names=["x", "y", "z", "intensity"])
    # sensor_msgs_py ignores row_step: the second row starts 12 bytes early, inside the first row's padding.
    assert np.array_equal(reference[:64], expected[:64])
    assert not np.array_equal(reference[64:], expected[64:])


def test_big_endian_sensor_msgs_py_swaps_the_message_in_place_ours_reads_it_twice_the_same(scan, smp):
    points = scan[:1000]
    big = points.astype(">f4")
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, n in enumerate(["x", "y", "z", "intensity"])]

    def message():
        return PointCloud2(header=make_header("velodyne", T0, rclpy_types()), height=1, width=len(points),
                           fields=fields, is_bigendian=True, point_step=16, row_step=16 * len(points),
                           data=big.tobytes(), is_dense=True)

    cloud = message()
    for _ in range(2):
        ours = read_fields(cloud, ["x", "y", "z", "intensity"])
        assert np.array_equal(np.stack([ours[n] for n in ("x", "y", "z", "intensity")], 1), points)
    assert bytes(cloud.data) == big.tobytes()  # ours never writes into the message
    cloud = message()
    first = smp.read_points_numpy(cloud, field_names=["x", "y", "z", "intensity"])
    assert np.array_equal(first, points)  # right once, but it byte-swapped the message's own buffer ...
    assert bytes(cloud.data) != big.tobytes()
    second = smp.read_points_numpy(cloud, field_names=["x", "y", "z", "intensity"])
    assert not np.array_equal(second, points)  # ... so a second reader of the same message gets garbage


# ------------------------------------------------------------------------------------ tf_transformations


def test_quaternion_and_matrix_helpers_agree_with_tf_transformations(tf_transformations):
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = tf_transformations.random_quaternion(rng.random(3))  # (x, y, z, w), ROS order
        R_ref = tf_transformations.quaternion_matrix(q)[:3, :3]
        assert np.abs(quaternion_to_matrix(q) - R_ref).max() < 1e-12
        assert np.abs(quaternion_to_matrix(3.0 * q) - R_ref).max() < 1e-12  # normalized first
        back = matrix_to_quaternion(R_ref)
        ref = tf_transformations.quaternion_from_matrix(tf_transformations.quaternion_matrix(q))
        ref = -ref if ref[3] < 0 else ref  # one sign convention: w >= 0
        assert np.abs(back - ref).max() < 1e-12
        t = rng.normal(size=3)
        T = make_transform(R_ref, t)
        T_ref = tf_transformations.concatenate_matrices(tf_transformations.translation_matrix(t),
                                                        tf_transformations.quaternion_matrix(q))
        assert np.abs(T - T_ref).max() < 1e-12
        from sal_ros.core.transforms import invert_transform

        assert np.abs(invert_transform(T) - tf_transformations.inverse_matrix(T_ref)).max() < 1e-12


# --------------------------------------------------------------------------------------- message_filters

CLOUDS = 20
OFFSETS = {"front": -35 * MS, "side": 10 * MS}  # image stamp - cloud stamp per camera (nuScenes-like)
MISSING = {("side", 5), ("side", 12)}  # dropped camera frames
STRAY = {("front", 8): 15 * MS}  # an extra front image 15 ms after cloud 8 (a double trigger)
LATENCY = {"cloud": 50 * MS, "front": 20 * MS, "side": 20 * MS}  # stamp -> arrival


def message_sequence():
    """(arrival, topic, stamp, capture index or None for the stray) in arrival order."""
    out = []
    for k in range(CLOUDS):
        t = T0 + k * 100 * MS
        out.append((t + LATENCY["cloud"], "cloud", t, k))
        for cam, offset in OFFSETS.items():
            if (cam, k) not in MISSING:
                out.append((t + offset + LATENCY[cam], cam, t + offset, k))
            if (cam, k) in STRAY:
                out.append((t + STRAY[(cam, k)] + LATENCY[cam], cam, t + STRAY[(cam, k)], None))
    return sorted(out)


def score(sets):
    """sets: [(cloud index, {camera: capture index or None for the stray})] -> the table's numbers."""
    complete = [s for s in sets if len(s[1]) == len(OFFSETS)]
    right = sum(all(v == k for v in images.values()) for k, images in complete)
    wrong_images = sum(v != k for k, images in sets for v in images.values())
    return {"clouds_out": len(sets), "complete": len(complete), "complete_right": right,
            "partial": len(sets) - len(complete), "wrong_images": wrong_images,
            "clouds_lost": CLOUDS - len({k for k, _ in sets})}


def run_ours(match_threshold_ms=20, timeout_ms=50):
    sync = LidarAnchoredSynchronizer(list(OFFSETS), OFFSETS, match_threshold_ns=match_threshold_ms * MS,
                                     timeout_ns=timeout_ms * MS)
    out = []
    for arrival, topic, stamp, k in message_sequence():
        ready = sync.poll(arrival)
        ready += sync.add_cloud(stamp, k, received_ns=arrival) if topic == "cloud" else \
            sync.add_camera(topic, stamp, k)
        out += ready
    out += sync.flush()
    return score([(s.cloud, {c: payload for c, (_, payload) in s.images.items()}) for s in out])


def run_message_filters(message_filters, slop_s):
    types = rclpy_types()
    inputs = {topic: message_filters.SimpleFilter() for topic in ("cloud", *OFFSETS)}
    sync = message_filters.ApproximateTimeSynchronizer(list(inputs.values()), queue_size=10, slop=slop_s)
    got = []
    sync.registerCallback(lambda *msgs: got.append(msgs))
    for _, topic, stamp, k in message_sequence():
        msg = Image(header=make_header(topic, stamp, types))
        msg.width = -1 if k is None else k  # the capture index rides along
        inputs[topic].signalMessage(msg)
    return score([(cloud.width, {cam: (None if m.width == 2**32 - 1 else m.width) for cam, m in zip(OFFSETS, imgs)})
                  for cloud, *imgs in got])


def test_lidar_anchored_sync_beside_message_filters_approximate_time(message_filters):
    ours = run_ours()
    mf_wide = run_message_filters(message_filters, slop_s=0.05)  # wide enough for the -35 / +10 ms offsets
    mf_tight = run_message_filters(message_filters, slop_s=0.03)  # the match threshold without the offsets
    print("\n| synchronizer | clouds out | complete, right | partial | wrong images | clouds lost |")
    for name, r in (("ours (offsets, threshold 20 ms, timeout 50 ms)", ours),
                    ("ApproximateTimeSynchronizer, slop 50 ms", mf_wide),
                    ("ApproximateTimeSynchronizer, slop 30 ms", mf_tight)):
        print(f"| {name} | {r['clouds_out']} / {CLOUDS} | {r['complete_right']} | {r['partial']} | "
              f"{r['wrong_images']} | {r['clouds_lost']} |")
    # Ours: every cloud comes out; the two without a side image as partial sets; the stray is never taken.
    assert ours == {"clouds_out": 20, "complete": 18, "complete_right": 18, "partial": 2, "wrong_images": 0,
                    "clouds_lost": 0}
    # message_filters: only complete sets, so a missing image loses its cloud; one slop for all cameras.
    assert mf_wide["partial"] == 0 and mf_wide["clouds_lost"] >= 2
    assert mf_wide["wrong_images"] >= 1  # the stray, nearer to the cloud than the right image, is taken
    assert mf_tight["complete_right"] == 0  # the front camera's 35 ms offset is outside a 30 ms slop
