"""``sal-ros bench node``: what the segmenter node costs besides the model, on a 120k-point cloud.

Runs the node's own code paths on a real SemanticKITTI scan (random points when the data is absent) with a
realistic segmentation (its ground-truth segments as instances): the synchronizer (add + poll), decoding the
driver-layout PointCloud2 into a Frame, and publishing (labeled cloud encode, markers, info record, and rclpy's
serialization in ``publish``) through a real ``SegmenterNode`` with nobody listening to the network. The camera
overlay is timed separately (it is optional and per camera). Prints JSON with per-stage medians of wall time and
of this thread's CPU time (``cpu_median_ms``: on a busy machine wall time mostly measures waiting for a core), and
the fresh-buffer encode beside the node's reused-buffer one; the goal is <= 3 ms for sync + decode + publish.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sal_ros.bench.env import add_thread_argument, apply_threads, environment, finish
from sal_ros.bench.timing import median_ms

GOAL_MS = 3.0
WARMUP = 10  # untimed rounds before the interleaved typed-outputs timing
DEFAULT_SCAN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "semantickitti" / "sequences" / "00"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_SCAN, help="SemanticKITTI sequence folder")
    parser.add_argument("--points", type=int, default=120_000, help="points per cloud (default 120000)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--domain-id", type=int, default=97, help="private ROS domain of the bench node")
    parser.add_argument("--typed-outputs", choices=("on", "off"), default="on",
                        help="on: also time the tracker + ~/detections + ~/frame_summary beside the JSON-era "
                             "outputs, side by side in the same run")
    parser.add_argument("--model", metavar="PRESET", default=None,
                        help="instead: the whole per-scan path (decode, model, track, publish) of a node running a "
                             "seeded PRESET model (e.g. realtime) on the real scan; goal <= 50 ms of CPU")
    add_thread_argument(parser)


def scan_and_segmentation(data: Path, n: int) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """``n`` points of a real scan (tiled / cut), intensities, a Segmentation of its ground truth, and the source."""
    from sal_ros.core.types import Segmentation
    from sal_ros.core.panoptic import instance_summaries

    rng = np.random.default_rng(0)
    velodyne = sorted((data / "velodyne").glob("*.bin")) if data.is_dir() else []
    if velodyne:
        scan = np.fromfile(velodyne[0], np.float32).reshape(-1, 4)
        labels = np.fromfile(data / "labels" / f"{velodyne[0].stem}.label", np.uint32)
        take = np.resize(np.arange(len(scan)), n)
        xyz, intensity, raw = scan[take, :3].copy(), scan[take, 3].copy(), labels[take]
        source = str(velodyne[0])
    else:
        xyz = rng.normal(scale=20.0, size=(n, 3)).astype(np.float32)
        intensity = rng.random(n, dtype=np.float32)
        raw = (rng.integers(0, 30, n) << 16 | 10).astype(np.uint32)
        source = "random points (no SemanticKITTI data)"
    names = tuple(f"class{k}" for k in range(20))
    label = ((raw & 0xFFFF) % 20 + 1).astype(np.uint16)
    _, instance = np.unique(raw >> 16, return_inverse=True)
    instance = instance.reshape(-1).astype(np.uint32)
    score = rng.random(n, dtype=np.float32)
    seg = Segmentation(label=label, instance=instance, score=score, class_names=names)
    seg.instances = instance_summaries(xyz, instance, label, score, names)
    return xyz, intensity, seg, source


def main(args: argparse.Namespace) -> int:
    from sal_ros.env import apply_ros_env_defaults

    apply_ros_env_defaults(domain_id=args.domain_id)
    threads = apply_threads(args.threads)  # the node's policy unless --threads
    env = environment()
    import rclpy

    from sal_ros.bench.codec import make_driver_cloud
    from sal_ros.nodes.messages import rclpy_types
    from sal_ros.core.sync import LidarAnchoredSynchronizer
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER
    from sal_ros.nodes import outputs
    from sal_ros.nodes import params as P
    from sal_ros.nodes.segmenter import SegmenterNode

    if args.model:
        from sal_ros.bench.whole_path import whole_path

        scan = next(iter(sorted((args.data / "velodyne").glob("*.bin"))), None) if args.data.is_dir() else None
        if scan is None:
            print(f"sal-ros bench node: no SemanticKITTI scan under {args.data}/velodyne", file=sys.stderr)
            return 1
        result = {"bench": "node_whole_path", **whole_path(args.model, scan, args.repeats, args.domain_id),
                  "scan": str(scan), "repeats": args.repeats, "threads": threads, "environment": finish(env)}
        print(json.dumps(result, indent=1))
        return 0
    types = rclpy_types()
    xyz, intensity, seg, source = scan_and_segmentation(args.data, args.points)
    stamp = 1_700_000_000_000_000_000
    msg = make_driver_cloud(xyz, intensity, types, stamp)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=args.domain_id)
    node = SegmenterNode(context=context, parameter_overrides=P.overrides(P.SEGMENTER_NODE, {
        "model.device": "cpu", "text_encoder.model": TINY_TEXT_ENCODER, "prompts": list(seg.class_names),
        "allow_duplicate": True}))  # a bench node answers nothing: a segmenter running beside it is no conflict
    try:
        sync = LidarAnchoredSynchronizer(cameras=[])
        clock = iter(range(1, 10**9))

        def sync_once():
            i = next(clock)
            ready = sync.add_cloud(stamp + i * 100_000_000, msg, time.monotonic_ns())
            return ready + sync.poll(time.monotonic_ns())

        synced = sync_once()[0]
        frame = node.inputs.decode(synced, with_cameras=False).frame
        wanted = {"labeled_points": True, "markers": True, "info": True, "overlays": set()}
        stages, stages_cpu = timed({
            "sync": sync_once,
            "decode": lambda: node.inputs.decode(synced, with_cameras=False),
            "publish": lambda: node.outputs.frame(frame, seg, wanted),
        }, args.repeats)
        typed = typed_outputs(node, frame, seg, wanted, args) if args.typed_outputs != "off" else {}
        palette = outputs.class_colors(len(seg.class_names))
        parts, parts_cpu = timed({  # inside publish
            "encode_cloud": lambda: outputs.labeled_cloud(frame.points, frame.intensity, seg, "lidar", stamp, types,
                                                          palette, node.outputs.cloud_encoder),  # reused buffer
            "markers": lambda: outputs.instance_markers(seg.instances, "lidar", stamp, palette, types, 5,
                                                        vocabulary_version=seg.vocabulary_version,
                                                        pool=node.outputs.marker_pool),  # the node's: reused markers
            "info_record": lambda: outputs.frame_record(stamp, "lidar", seg, frame.num_points, ()),
            # reference, same run: the same cloud into a fresh buffer each frame (what encode_cloud does)
            "encode_cloud_fresh_buffer": lambda: outputs.labeled_cloud(frame.points, frame.intensity, seg, "lidar",
                                                                       stamp, types, palette),
        }, args.repeats)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    total, total_cpu = sum(stages.values()), sum(stages_cpu.values())
    result = {
        "bench": "node",
        "points": args.points,
        "scan": source,
        "instances": len(seg.instances),
        "median_ms": _rounded(stages),
        "publish_parts_median_ms": _rounded(parts),
        "overhead_ms": round(total, 3),
        # this thread's CPU time: what the node's work costs, less inflated than wall time on a busy machine
        "cpu_median_ms": _rounded(stages_cpu),
        "publish_parts_cpu_median_ms": _rounded(parts_cpu),
        "overhead_cpu_ms": round(total_cpu, 3),
        "encode_reuse_speedup_cpu": round(parts_cpu["encode_cloud_fresh_buffer"] / parts_cpu["encode_cloud"], 2),
        **typed,
        "goal_ms": GOAL_MS,
        "meets_goal": total <= GOAL_MS,
        "meets_goal_cpu": total_cpu <= GOAL_MS,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": threads,
        "environment": finish(env),
    }
    print(json.dumps(result, indent=1))
    return 0


def timed(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms and median thread-CPU ms of each call."""
    wall = {name: median_ms(fn, repeats) for name, fn in fns.items()}
    return wall, {name: median_ms(fn, repeats, clock=time.thread_time_ns) for name, fn in fns.items()}


def _rounded(ms: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in ms.items()}


def typed_outputs(node: Any, frame: Any, seg: Any, wanted: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The tracker and the typed outputs (~/detections, ~/frame_summary) on top of ``wanted``, timed beside it in
    the same run: publish with them on, and the parts (tracker update + apply, each builder)."""
    import copy

    from sal_ros.core.tracking import apply_tracks
    from sal_ros.nodes import outputs

    on = {**wanted, "detections": True, "frame_summary": True}
    plain, tracked = copy.deepcopy(seg), copy.deepcopy(seg)  # each side its own arrays, alike in memory

    def track_and_publish():
        node.outputs.frame(frame, tracked, on, node.tracking.track(frame, tracked), tracked.timings_ms)

    off, on_ = [], []
    sides = [(lambda: node.outputs.frame(frame, plain, wanted), off), (track_and_publish, on_)]
    for k in range(args.repeats + WARMUP):  # interleaved, order alternating: load and cache hit both alike
        for fn, times in (sides if k % 2 else sides[::-1]):
            t0 = time.perf_counter()
            fn()
            if k >= WARMUP:  # the first rounds warm up allocations (they ran up to 2x slower)
                times.append((time.perf_counter() - t0) * 1e3)
    off_ms, on_ms = float(np.median(off)), float(np.median(on_))
    tracker = node.tracking.tracker
    result = tracker.update(tracked.instances, frame.stamp_ns)
    classes = {t.track_id: t.classes for t in result.by_instance.values()}
    parts = {
        "tracker": median_ms(lambda: apply_tracks(tracked, tracker.update(tracked.instances, frame.stamp_ns)),
                             args.repeats),
        "detections": median_ms(lambda: outputs.detections_message(tracked.instances, "lidar", frame.stamp_ns,
                                                                   tracked.class_names, node._types, classes),
                                args.repeats),
        "frame_summary": median_ms(lambda: outputs.frame_summary_message(tracked, "lidar", frame.stamp_ns,
                                                                         frame.num_points, node._types),
                                   args.repeats),
    }
    return {"typed_outputs": {"publish_off_ms": round(off_ms, 3), "track_and_publish_on_ms": round(on_ms, 3),
                              "added_ms": round(on_ms - off_ms, 3),
                              "parts_median_ms": {k: round(v, 3) for k, v in parts.items()}}}
