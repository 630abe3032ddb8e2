"""DBSCAN (against sklearn), ground removal, DBSCAN replace/filter, multi-camera fusion, occlusion test."""
import numpy as np
import pytest

from sal_ros.pseudolabel.fusion import CameraLift, fuse_cameras
from sal_ros.pseudolabel.lifting import LiftConfig, visible
from sal_ros.pseudolabel.refine import RefineConfig, compact, dbscan, dbscan_refine, ground_mask


def _same_partition(a, b):
    """Two labelings describe the same clusters (ids may differ); noise must agree exactly."""
    assert np.array_equal(a < 0, b < 0)
    pairs = np.unique(np.stack([a[a >= 0], b[b >= 0]], 1), axis=0)
    return len(pairs) == len(np.unique(a[a >= 0])) == len(np.unique(b[b >= 0]))


@pytest.mark.parametrize("eps, min_samples", [(0.3, 1), (0.5, 3), (0.8, 5)])
def test_dbscan_matches_sklearn_on_real_scan(semantickitti_dir, eps, min_samples):
    from sklearn import cluster as sklearn_cluster
    scan = np.fromfile(semantickitti_dir / "sequences/00/velodyne/000000.bin", np.float32).reshape(-1, 4)[:, :3]
    pts = scan[(scan[:, 0] > 5) & (scan[:, 0] < 25) & (np.abs(scan[:, 1]) < 10)]  # ~a frustum's worth
    ours = dbscan(pts, eps, min_samples)
    ref = sklearn_cluster.DBSCAN(eps=eps, min_samples=min_samples).fit_predict(pts)
    core = sklearn_cluster.DBSCAN(eps=eps, min_samples=min_samples).fit(pts).core_sample_indices_
    # Core points must form identical clusters; border points may join either of two touching clusters.
    assert _same_partition(ours[core], ref[core])
    assert np.array_equal(ours < 0, ref < 0)


def _scene(seed=0):
    """Flat ground, two boxes standing on it, 1 m apart."""
    rng = np.random.default_rng(seed)
    ground = np.c_[rng.uniform(0, 20, 4000), rng.uniform(-10, 10, 4000), rng.normal(0, 0.02, 4000)]
    car = np.c_[rng.uniform(8, 12, 800), rng.uniform(-1, 1, 800), rng.uniform(0.3, 1.5, 800)]
    van = np.c_[rng.uniform(13, 17, 800), rng.uniform(-1, 1, 800), rng.uniform(0.3, 2.0, 800)]
    return np.concatenate([ground, car, van]).astype(np.float32), 4000


def test_ground_mask_finds_plane():
    pts, n_ground = _scene()
    g = ground_mask(pts, 0.25)
    assert g[:n_ground].mean() > 0.99 and g[n_ground:].mean() < 0.01


def test_dbscan_replace_fixes_bleeding_and_fills_holes():
    pts, ng = _scene()
    car, van = np.arange(ng, ng + 800), np.arange(ng + 800, ng + 1600)
    inst = np.zeros(len(pts), np.int64)
    inst[car[:600]] = 1  # the mask missed a quarter of the car ...
    inst[van[:40]] = 1  # ... and bled onto the van
    inst[np.arange(0, 100)] = 1  # and onto the ground (ground points are never clustered: they keep it)
    inst[van[100:]] = 2
    cfg = RefineConfig(eps=(0.3, 0.6), min_samples=3, iou_threshold=0.5)
    out = dbscan_refine(pts, inst, np.ones(len(pts), bool), cfg)
    assert np.all(out[car] == 1) and np.all(out[van] == 2)
    assert np.all(out[100:ng] == 0) and np.all(out[:100] == 1)
    filt = dbscan_refine(pts, inst, np.ones(len(pts), bool), RefineConfig(eps=(0.3, 0.6), mode="filter"))
    assert np.all(filt[car[:600]] == 1) and np.all(filt[car[600:]] == 0)  # filter removes, never adds
    assert np.all(filt[van[:40]] == 0)
    # Without ground removal the ground is one big cluster: the bleed onto it is removed too.
    no_ground = RefineConfig(eps=(0.3, 0.6), remove_ground=False)
    assert np.all(dbscan_refine(pts, inst, np.ones(len(pts), bool), no_ground)[:100] != 1)
    # Clusters only come from candidate points: outside them nothing is added.
    cand = np.ones(len(pts), bool)
    cand[car[600:]] = False
    out = dbscan_refine(pts, inst, cand, cfg)
    assert np.all(out[car[600:]] == 0)


def test_compact():
    inst = np.array([0, 3, 3, 5, 7, 7, 7])
    new, kept = compact(inst, min_points=2)
    assert new.tolist() == [0, 1, 1, 0, 2, 2, 2] and kept.tolist() == [3, 7] and new.dtype == np.uint32


def _lift(name, n, assign, tokens, scores, areas, visible_idx):
    mask_id = np.full(n, -1, np.int32)
    for m, idx in assign.items():
        mask_id[idx] = m
    vis = np.zeros(n, bool)
    vis[visible_idx] = True
    return CameraLift(name, mask_id, vis, vis.copy(), np.asarray(tokens, np.float32), np.asarray(scores, np.float32),
                      np.asarray(areas))


def test_fusion_merges_object_across_camera_seam():
    n = 300
    # Camera A sees points 0..159, camera B 140..299: 20 co-visible points.
    # Object X spans 100..199 (seen half by each), object Y only in A, object Z only in B.
    ta, tb = np.eye(4)[0], np.eye(4)[1]
    a = _lift("A", n, {0: np.arange(100, 160), 1: np.arange(10, 40)}, [ta, np.eye(4)[2]], [0.9, 0.8], [300, 100],
              np.arange(0, 160))
    b = _lift("B", n, {0: np.arange(140, 200), 1: np.arange(250, 280)}, [tb, np.eye(4)[3]], [0.7, 0.6], [100, 50],
              np.arange(140, 300))
    fused = fuse_cameras([a, b], n, iou_threshold=0.3)
    x = fused.instance[100]
    assert x > 0 and np.all(fused.instance[100:200] == x)  # one instance across the seam
    assert len(fused.tokens) == 3
    tok = fused.tokens[x - 1]
    expect = (300 * ta + 100 * tb) / np.linalg.norm(300 * ta + 100 * tb)  # area-weighted
    np.testing.assert_allclose(tok, expect, atol=1e-6)
    assert fused.cameras[x - 1] == 0b11 and fused.cameras[fused.instance[20] - 1] == 0b01
    assert fused.cameras[fused.instance[260] - 1] == 0b10
    np.testing.assert_allclose(fused.scores[x - 1], (0.9 * 300 + 0.7 * 100) / 400, rtol=1e-6)
    assert fused.in_frustum.all()


def test_fusion_keeps_disagreeing_instances_apart():
    n = 100
    a = _lift("A", n, {0: np.arange(0, 60)}, [np.eye(2)[0]], [0.9], [10], np.arange(0, 100))
    b = _lift("B", n, {0: np.arange(50, 100)}, [np.eye(2)[1]], [0.5], [10], np.arange(0, 100))
    fused = fuse_cameras([a, b], n, iou_threshold=0.5)
    assert len(fused.tokens) == 2
    assert np.all(fused.instance[:60] == fused.instance[0])  # contested 50..59 -> higher score (A)
    assert np.all(fused.instance[60:] != fused.instance[0])


def test_occlusion_test_hides_points_behind_nearer_ones():
    # A wall at 10 m covering columns 100..199, background at 30 m everywhere, one row of pixels.
    u = np.r_[np.arange(100, 200, 2), np.arange(0, 300, 3)]
    v = np.full(u.size, 50)
    depth = np.r_[np.full(50, 10.0), np.full(100, 30.0)].astype(np.float32)
    cfg, box = LiftConfig(), (2.0, 3.0)  # samples 2 px apart: the box reaches the next wall sample
    vis = visible(u, v, depth, (100, 300), cfg, box)
    assert vis[:50].all()  # the wall is visible
    bg_u = u[50:]
    hidden = ~vis[50:]
    assert np.all(hidden[(bg_u >= 100) & (bg_u < 200)])  # background behind the wall is hidden
    assert not hidden[(bg_u < 97) | (bg_u > 201)].any()  # no halo beyond 1.5 boxes of the wall's samples
    assert visible(u, v, depth, (100, 300), LiftConfig(occlusion=False), box).all()  # naive mode
    # Tolerance: a surface receding slowly (road) is not hidden by its own nearer part.
    depth_road = np.linspace(10, 10.5, u.size).astype(np.float32)
    assert visible(u, v, depth_road, (100, 300), cfg, box).all()
