"""SAM2-AMML (issue 16): prompt elimination and multi-mask fusion on constructed data, prompts from real lidar,
and the whole sam2_lidar mask source with the seeded random SAM 2 (plumbing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from sal_ros.pseudolabel.amml import (DROP_BORDER, DROP_BOUNDARY, PromptConfig, eliminate_prompts, fuse_masks,
                                      lidar_prompts)


def _box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_fusion_merges_overlapping_masks_transitively_and_keeps_the_rest():
    shape = (40, 60)
    a = _box(shape, 0, 10, 0, 10)
    b = _box(shape, 0, 10, 2, 12)  # IoU with a: 80 / 120 = 0.67
    c = _box(shape, 0, 10, 4, 14)  # IoU with b 0.67, with a 0.43: joins through b
    d = _box(shape, 20, 30, 20, 30)  # alone
    e = _box(shape, 20, 30, 25, 35)  # IoU with d: 50 / 150 = 0.33 < 0.5: stays apart
    fused = fuse_masks(np.stack([a, b, c, d, e]), np.array([0.9, 0.5, 0.7, 0.8, 0.6]), iou_threshold=0.5)
    assert len(fused) == 3
    areas = sorted(fused.areas.tolist())
    assert areas == [100, 100, 140]  # a | b | c = 10 x 14
    big = int(np.argmax(fused.areas))
    assert fused.scores[big] == np.float32(0.9)  # the group's best score
    assert (fused.masks[big] == (a | b | c)).all()
    assert len(fuse_masks(np.stack([d, e]), np.array([1.0, 1.0]), iou_threshold=0.3)) == 1  # a lower threshold fuses


def test_elimination_drops_border_and_boundary_prompts():
    cfg = PromptConfig(border_px=5, boundary_px=3)
    prompts = np.array([[2.0, 20.0],  # 2 px from the left border
                        [30.0, 20.0],  # inside cluster 0, far from cluster 1
                        [50.0, 20.0],  # cluster 0's prompt, 2 px from a cluster-1 point: a boundary
                        [80.0, 37.0]])  # 3 px from the bottom of a 40-row image: border
    prompt_cluster = np.array([0, 0, 0, 1])
    uv = np.array([[30, 20], [31, 20], [50, 20], [52, 20], [80, 30]], np.float64)
    cluster = np.array([0, 0, 0, 1, 1])
    reasons = eliminate_prompts(prompts, prompt_cluster, uv, cluster, (40, 100), cfg)
    assert reasons.tolist() == [DROP_BORDER, 0, DROP_BOUNDARY, DROP_BORDER]
    # noise points (cluster -1) are no boundary
    reasons = eliminate_prompts(prompts[1:2], prompt_cluster[1:2], uv, np.array([0, 0, 0, -1, -1]), (40, 100), cfg)
    assert reasons.tolist() == [0]


def test_prompts_from_real_lidar_land_on_their_clusters(semantickitti_dir):
    from sal_ros.data.sources import FrameSource

    src = FrameSource(semantickitti_dir)
    frame = src.load(src.keys()[0])
    view = frame.cameras["image_0"]
    prompts, ids, uv, cluster = lidar_prompts(frame.points, view)
    h, w = view.image.shape[:2]
    assert len(prompts) >= 10 and (prompts[:, 0] >= 0).all() and (prompts[:, 0] < w).all()
    # each prompt is the pixel of one of its own cluster's points
    for p, c in zip(prompts, ids):
        assert np.any((uv[cluster == c] == p).all(1))
    reasons = eliminate_prompts(prompts, ids, uv, cluster, (h, w))
    assert 0 < (reasons == 0).sum() < len(prompts)  # some prompts sit on boundaries in a street scene


def test_sam2_lidar_masks_through_the_engine_with_random_sam2(tmp_path, semantickitti_dir):
    """Plumbing only: random SAM 2 weights give meaningless masks, but every stage runs and writes its file."""
    out = tmp_path / "pl"
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "pseudolabel", str(semantickitti_dir), "--masks",
                           "sam2_lidar", "--random-weights", "--image-size", "256", "--no-tokens", "--max-frames",
                           "1", "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["done"] == 1
    from sal_ros.data.pseudolabels import load_pseudolabels

    pl = load_pseudolabels(out / "00_000000.npz")
    assert pl.meta["mask_source"]["source"] == "sam2_lidar" and pl.meta["mask_source"]["prompts"]["border_px"] == 8.0
    assert pl.in_frustum.sum() > 10000
