"""``sal-ros bench codec``: PointCloud2 decode/encode time vs a per-point Python (struct) reference, one run.

Decode: xyz + intensity out of a lidar-driver-like cloud (x y z intensity t ring, point_step 32).
Encode: the segmenter's output cloud (x y z intensity label instance score rgb).
Prints JSON with medians in ms, the reference medians measured in the same process, and the speed-ups.
Uses rclpy message objects when rclpy imports (what the nodes handle), else rosbags dataclasses. With rclpy, the
ROS library codec runs side by side too: sensor_msgs_py's ``create_cloud`` given the same points already packed
in a structured array of the same layout (its fastest input), and ``read_points`` for x y z intensity;
``encode_vs_create_cloud`` is our time over its time (goal <= 1), ``encode_reused_buffer_vs_create_cloud`` the
same for the node's CloudEncoder (its buffer reused from cloud to cloud). The codec is numpy only (one thread).
"""
from __future__ import annotations

import argparse
import array
import json
import platform
import struct
import sys
from typing import Any

import numpy as np

from sal_ros.bench.env import environment, finish
from sal_ros.bench.timing import median_ms
from sal_ros.core.msgtypes import MessageTypes, make_header, rosbags_types
from sal_ros.nodes.messages import rclpy_types
from sal_ros.core.pointcloud2 import CloudEncoder, encode_cloud, pack_rgb, read_xyz_intensity

GOAL_MS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", type=int, default=120_000, help="points per cloud (default 120000)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats of the numpy codec (default 50)")
    parser.add_argument("--reference-repeats", type=int, default=3,
                        help="timed repeats of the per-point Python reference (default 3)")
    parser.add_argument("--backend", choices=("auto", "rclpy", "rosbags"), default="auto",
                        help="message objects to use (auto: rclpy if it imports, else rosbags)")


def main(args: argparse.Namespace) -> int:
    env = environment(with_torch=False)
    types = _types(args.backend)
    rng = np.random.default_rng(0)
    n = args.points
    driver_cloud = make_driver_cloud(rng.normal(scale=20.0, size=(n, 3)).astype(np.float32),
                                    rng.random(n, dtype=np.float32) * 255, types)
    seg = _segmentation_fields(rng, n)

    xyz, intensity = read_xyz_intensity(driver_cloud)
    ref_xyz, ref_intensity = reference_decode(driver_cloud)
    if not (np.array_equal(xyz, ref_xyz) and np.array_equal(intensity, ref_intensity)):
        raise AssertionError("numpy decode disagrees with the struct reference")
    encoded = encode_cloud(seg, "lidar", 0, types)
    if bytes(encoded.data) != bytes(reference_encode(seg, types).data):
        raise AssertionError("numpy encode disagrees with the struct reference")

    decode_ms = median_ms(lambda: read_xyz_intensity(driver_cloud), args.repeats)
    encode_ms = median_ms(lambda: encode_cloud(seg, "lidar", 0, types), args.repeats)
    ref_decode_ms = median_ms(lambda: reference_decode(driver_cloud), args.reference_repeats, warmup=0)
    ref_encode_ms = median_ms(lambda: reference_encode(seg, types), args.reference_repeats, warmup=0)
    result = {
        "bench": "codec",
        "backend": types.backend,
        "points": n,
        "decode": {
            "what": "read_xyz_intensity on x y z intensity t ring (point_step 32)",
            "median_ms": round(decode_ms, 4),
            "reference_median_ms": round(ref_decode_ms, 2),
            "speedup": round(ref_decode_ms / decode_ms, 1),
            "repeats": args.repeats,
            "reference_repeats": args.reference_repeats,
            "meets_goal": decode_ms <= GOAL_MS,
        },
        "encode": {
            "what": "encode_cloud x y z intensity label instance score rgb (point_step 32)",
            "median_ms": round(encode_ms, 4),
            "reference_median_ms": round(ref_encode_ms, 2),
            "speedup": round(ref_encode_ms / encode_ms, 1),
            "repeats": args.repeats,
            "reference_repeats": args.reference_repeats,
            "meets_goal": encode_ms <= GOAL_MS,
        },
        "goal_ms": GOAL_MS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    if types.backend == "rclpy":
        result["sensor_msgs_py"] = bench_sensor_msgs_py(driver_cloud, seg, encoded, types, args.repeats)
    result["environment"] = finish(env)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _types(backend: str) -> MessageTypes:
    if backend in ("auto", "rclpy"):
        try:
            return rclpy_types()
        except ImportError:
            if backend == "rclpy":
                raise
    return rosbags_types()


# ------------------------------------------------------------------------------------------------ inputs


def make_driver_cloud(xyz: np.ndarray, intensity: np.ndarray, types: MessageTypes, stamp_ns: int = 0) -> Any:
    """A 64-beam spinning-lidar-like cloud: x y z, intensity at 16, t (ns) at 20, ring at 24, point_step 32."""
    n = len(xyz)
    dtype = np.dtype({"names": ["x", "y", "z", "intensity", "t", "ring"],
                      "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2"],
                      "offsets": [0, 4, 8, 16, 20, 24], "itemsize": 32})
    data, raw = types.byte_buffer(n * dtype.itemsize)
    points = raw.view(dtype)
    points["x"], points["y"], points["z"] = np.asarray(xyz, np.float32).T
    points["intensity"] = intensity
    points["t"] = np.arange(n, dtype=np.uint32) * 800
    points["ring"] = np.arange(n) % 64
    fields = [types.PointField(name=name, offset=dtype.fields[name][1], datatype=code, count=1)
              for name, code in zip(dtype.names, (7, 7, 7, 7, 6, 4))]
    return types.PointCloud2(header=make_header("lidar", stamp_ns, types), height=1, width=n, fields=fields,
                             is_bigendian=False, point_step=32, row_step=32 * n, data=data, is_dense=True)


def _segmentation_fields(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    labels = rng.integers(0, 20, n).astype(np.uint16)
    palette = pack_rgb(rng.integers(0, 256, (21, 3)).astype(np.uint8))  # nodes colour by class: one lookup
    return {
        "xyz": rng.normal(scale=20.0, size=(n, 3)).astype(np.float32),
        "intensity": rng.random(n, dtype=np.float32),
        "label": labels,
        "instance": rng.integers(0, 200, n).astype(np.uint32),
        "score": rng.random(n, dtype=np.float32),
        "rgb": palette[labels],
    }


# ------------------------------------------------------------------------------------------------ reference


def reference_decode(msg: Any) -> tuple[np.ndarray, np.ndarray]:
    """What a hand-written per-point reader does: struct.unpack_from for every point."""
    offsets = {f.name: f.offset for f in msg.fields}
    data = bytes(msg.data)
    step = msg.point_step
    xyz_off, i_off = offsets["x"], offsets["intensity"]
    xyz, intensity = [], []
    for k in range(msg.width * msg.height):
        base = k * step
        xyz.append(struct.unpack_from("<fff", data, base + xyz_off))
        intensity.append(struct.unpack_from("<f", data, base + i_off)[0])
    return np.array(xyz, np.float32).reshape(-1, 3), np.array(intensity, np.float32)


def reference_encode(fields: dict[str, np.ndarray], types: MessageTypes) -> Any:
    """Per-point struct.pack_into into a bytearray, the same layout as encode_cloud."""
    xyz, n = fields["xyz"], len(fields["xyz"])
    rows = zip(xyz.tolist(), fields["intensity"].tolist(), fields["label"].tolist(), fields["instance"].tolist(),
               fields["score"].tolist(), fields["rgb"].view(np.uint32).tolist())
    buf = bytearray(32 * n)
    for k, ((x, y, z), i, label, inst, score, rgb) in enumerate(rows):
        struct.pack_into("<ffffHxxIfI", buf, 32 * k, x, y, z, i, label, inst, score, rgb)
    kinds = [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 7), ("label", 16, 4), ("instance", 20, 6),
             ("score", 24, 7), ("rgb", 28, 7)]
    return types.PointCloud2(
        header=make_header("lidar", 0, types), height=1, width=n,
        fields=[types.PointField(name=nm, offset=off, datatype=dt, count=1) for nm, off, dt in kinds],
        is_bigendian=False, point_step=32, row_step=32 * n,
        data=array.array("B", buf) if types.backend == "rclpy" else np.frombuffer(buf, np.uint8), is_dense=True,
    )


# ------------------------------------------------------------------------------------- sensor_msgs_py, same run


def bench_sensor_msgs_py(driver_cloud: Any, seg: dict[str, np.ndarray], encoded: Any, types: MessageTypes,
                         repeats: int) -> dict:
    """sensor_msgs_py's create_cloud / read_points on the same clouds, checked to give the same bytes / values, and
    timed call by call alternately with ours, so that a load change on a shared machine hits both alike.

    create_cloud is timed twice: given the points already packed in the output layout (its fastest input, one
    memcpy; the packing is not counted) and given the same columns we get (packed into a structured array first,
    as a node that holds columns must do)."""
    from sensor_msgs_py import point_cloud2 as pc2

    from sal_ros.core.pointcloud2 import _columns, point_dtype

    dtype = point_dtype(encoded)
    packed = np.frombuffer(bytes(encoded.data), dtype)  # our layout, already packed: create_cloud's best case
    header = make_header("lidar", 0, types)
    fields = list(encoded.fields)
    columns = _columns(seg)

    def from_columns():
        points = np.zeros(len(packed), dtype)  # zeroed padding, as ours
        for name, values in columns.items():
            points[name] = values
        return pc2.create_cloud(header, fields, points)

    for theirs in (pc2.create_cloud(header, fields, packed), from_columns()):
        if bytes(theirs.data) != bytes(encoded.data):
            raise AssertionError("create_cloud disagrees with encode_cloud")
    names = ("x", "y", "z", "intensity")
    got = pc2.read_points(driver_cloud, field_names=names)
    xyz, intensity = read_xyz_intensity(driver_cloud)
    if not (np.array_equal(got["x"], xyz[:, 0]) and np.array_equal(got["intensity"], intensity)):
        raise AssertionError("read_points disagrees with read_xyz_intensity")
    encoder = CloudEncoder(types)  # a publisher's: one reused buffer
    if bytes(encoder.encode(seg, "lidar", 0).data) != bytes(encoded.data):
        raise AssertionError("CloudEncoder disagrees with encode_cloud")
    ms = alternating_median_ms({
        "encode": lambda: encode_cloud(seg, "lidar", 0, types),
        "encode_reused_buffer": lambda: encoder.encode(seg, "lidar", 0),
        "create_cloud_packed": lambda: pc2.create_cloud(header, fields, packed),
        "create_cloud_from_columns": from_columns,
        "decode": lambda: read_xyz_intensity(driver_cloud),
        "read_points": lambda: pc2.read_points(driver_cloud, field_names=names),
    }, repeats)
    return {"alternating_median_ms": {k: round(v, 4) for k, v in ms.items()},
            "encode_vs_create_cloud": round(ms["encode"] / ms["create_cloud_packed"], 2),
            # what the segmenter node runs (its CloudEncoder reuses the buffer; create_cloud allocates each call)
            "encode_reused_buffer_vs_create_cloud": round(ms["encode_reused_buffer"] / ms["create_cloud_packed"], 2),
            "encode_vs_create_cloud_from_columns": round(ms["encode"] / ms["create_cloud_from_columns"], 2),
            "create_cloud_packed_input": "structured array already in the output layout (packing not counted)",
            "decode_vs_read_points": round(ms["decode"] / ms["read_points"], 2),
            "read_points_output": "structured view into msg.data (no copy); ours returns contiguous float32 arrays"}


def alternating_median_ms(fns: dict[str, Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each call, the calls taken in turn round after round (each result kept until its next call,
    as ``median_ms`` does)."""
    import time

    last: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            last[name] = fn()
    times: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            result = fn()
            times[name].append(time.perf_counter_ns() - start)
            last[name] = result
    return {name: float(np.median(t)) / 1e6 for name, t in times.items()}
