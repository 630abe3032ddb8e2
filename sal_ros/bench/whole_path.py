"""``sal-ros bench node --model PRESET``: the whole per-scan path of the segmenter node, as its callback runs it.

A seeded PRESET model (random weights: speed only) is saved as a checkpoint and loaded by a real ``SegmenterNode``,
which warms up as at launch; then the node's own frame callback (``_process``: decode the driver-layout PointCloud2,
the Segmenter, the tracker, every output message built and published) runs on the real 124,668-point scan, its
thread's CPU and wall time per frame taken. ``score_threshold`` 0 labels every point (a trained model's threshold
only removes postprocess work). Outputs are forced on with nobody listening, as the overhead bench publishes.
The issue-25 goal: <= 50 ms median for the whole path on one core.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

WHOLE_PATH_GOAL_MS = 50.0
WARMUP_FRAMES = 3


def whole_path(preset: str, scan_path: Path, repeats: int, domain_id: int) -> dict[str, Any]:
    """Median thread-CPU and wall ms of the node's frame callback per scan, with the node's own stage medians."""
    import rclpy
    import torch

    from sal_ros.bench.codec import make_driver_cloud
    from sal_ros.bench.model import load_scan, preset_config
    from sal_ros.core.sync import LidarAnchoredSynchronizer
    from sal_ros.model.checkpoint import save_checkpoint
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER
    from sal_ros.model.sal import SALModel
    from sal_ros.model.text_encoder import tiny_text_encoder
    from sal_ros.nodes import params as P
    from sal_ros.nodes.messages import rclpy_types
    from sal_ros.nodes.segmenter import OUTPUTS, SegmenterNode

    scan = load_scan(scan_path)
    stamp = 1_700_000_000_000_000_000
    msg = make_driver_cloud(np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3]), rclpy_types(), stamp)
    torch.manual_seed(0)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / f"{preset}.pt", SALModel(preset_config(preset)).eval(),
                                     text_encoder_identity=tiny_text_encoder())
        node = SegmenterNode(context=context, parameter_overrides=P.overrides(P.SEGMENTER_NODE, {
            "model.device": "cpu", "model.checkpoint": str(checkpoint), "text_encoder.model": TINY_TEXT_ENCODER,
            "score_threshold": 0.0, "allow_duplicate": True}))
    try:
        wanted = {name: True for name in OUTPUTS if name not in ("overlays", "filtered")} | {"filtered": False,
                                                                                           "overlays": set()}
        node.wanted_outputs = lambda: wanted  # every output built and published, nobody listening
        sync = LidarAnchoredSynchronizer(cameras=[])
        cpu, wall = [], []
        for i in range(WARMUP_FRAMES + max(1, repeats)):
            ready = sync.add_cloud(stamp + (i + 1) * 100_000_000, msg, time.monotonic_ns())
            synced = (ready + sync.poll(time.monotonic_ns()))[0]
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            node._process(synced)
            if i >= WARMUP_FRAMES:
                cpu.append((time.thread_time_ns() - c0) / 1e6)
                wall.append((time.perf_counter_ns() - t0) / 1e6)
        snapshot = node.stats.snapshot()
        stages = {stage: t["median_ms"] for stage, t in snapshot["timings"].items()}  # wall, warm-up frames too
        processed = snapshot["counts"].get("processed", 0)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    median_cpu = float(np.median(cpu))
    return {"preset": preset, "points": len(scan), "frames": len(cpu), "processed": processed,
            "median_cpu_ms": round(median_cpu, 2), "median_wall_ms": round(float(np.median(wall)), 2),
            "node_stage_medians_ms": stages, "goal_ms": WHOLE_PATH_GOAL_MS,
            "meets_goal_cpu": median_cpu <= WHOLE_PATH_GOAL_MS}


__all__ = ["whole_path", "WHOLE_PATH_GOAL_MS"]
