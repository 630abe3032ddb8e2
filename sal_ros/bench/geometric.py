"""``sal-ros bench geometric``: the geometric teacher's time per scan on real SemanticKITTI scans (JSON on stdout).

Per scan (the first ``--scans`` scans of each sequence): ground removal, clustering of the above-ground points,
the whole teacher (``geometric_instances``), rendering its instances into the camera (the mask source's
extra step); the reference timed in
the same run is the engine's global RANSAC ground plane (``refine.ground_mask``). Medians over ``--repeats``
runs of this thread's CPU time (a busy machine inflates it far less than wall time), wall time beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sal_ros.bench.env import environment, finish
from sal_ros.bench.timing import median_ms

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "semantickitti_mini" / "sequences"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a folder of SemanticKITTI sequences (or one sequence folder)")
    parser.add_argument("--scans", type=int, default=1, help="scans per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cluster-method", choices=["dbscan", "hdbscan"], default="dbscan")


def _sequences(path: Path) -> list[Path]:
    return [path] if (path / "velodyne").is_dir() else sorted(p for p in path.iterdir() if (p / "velodyne").is_dir())


def main(args: argparse.Namespace) -> int:
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.geometric import ClusterConfig, cluster_points, geometric_instances, ground_points
    from sal_ros.pseudolabel.geometric import render_segments
    from sal_ros.pseudolabel.refine import ground_mask

    env = environment(with_torch=False)
    cluster = ClusterConfig(method=args.cluster_method)
    stages = ("ground", "cluster", "teacher", "render", "reference_ransac_plane")
    cpu: dict[str, list[float]] = {k: [] for k in stages}
    wall: list[float] = []
    scans = []
    for seq in _sequences(args.data):
        source = FrameSource(seq)
        for key in source.keys()[:args.scans]:
            frame = source.load(key)
            pts = frame.points
            above = pts[~ground_points(pts)]
            instances, _ = geometric_instances(pts, cluster=cluster)
            view = next(iter(frame.cameras.values()), None)
            calls = {"ground": lambda: ground_points(pts), "cluster": lambda: cluster_points(above, cluster),
                     "teacher": lambda: geometric_instances(pts, cluster=cluster),
                     "render": lambda: render_segments(pts, view, instances),
                     "reference_ransac_plane": lambda: ground_mask(pts)}
            for name in stages:
                if name == "render" and view is None:
                    continue
                cpu[name].append(median_ms(calls[name], args.repeats, warmup=1, clock=time.thread_time_ns))
            wall.append(median_ms(calls["teacher"], args.repeats, warmup=0))
            scans.append({"key": key, "points": int(len(pts)), "above_ground": int(len(above))})
    med = {k: round(float(np.median(v)), 1) for k, v in cpu.items() if v}
    result = {"bench": "geometric", "scans": scans, "repeats": args.repeats, "cluster_method": args.cluster_method,
              "median_cpu_ms": med, "median_wall_ms_teacher": round(float(np.median(wall)), 1),
              "teacher_vs_ransac_plane": round(med["teacher"] / med["reference_ransac_plane"], 2),
              "per_scan_cpu_ms": {k: [round(x, 1) for x in v] for k, v in cpu.items()}, **finish(env)}
    print(json.dumps(result, indent=1))
    return 0
