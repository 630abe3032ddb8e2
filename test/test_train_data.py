"""Training samples: frustum crop, FrankenFrustum, scan mixing, augmentation and determinism."""
import numpy as np
import pytest

from sal_ros.core.errors import SensorDataError
from sal_ros.train.augment import AugmentConfig, augment, azimuth_center
from sal_ros.train.dataset import DataConfig, DistillDataset, LabeledScan


def _scan(seed: int, key: str) -> LabeledScan:
    """A scan whose camera sees azimuths in [-45, 45] deg; three labelled objects, each token one-hot by
    (scan, instance) so a sample's tokens reveal where every instance came from."""
    rng = np.random.default_rng(seed)
    az = rng.uniform(-np.pi, np.pi, 4000)
    r = rng.uniform(5, 30, 4000)
    pts = np.stack([r * np.cos(az), r * np.sin(az), rng.normal(0, 0.5, 4000)], 1).astype(np.float32)
    in_frustum = np.abs(az) < np.pi / 4
    inst = np.zeros(4000, np.int64)
    inst[in_frustum] = (np.floor((az[in_frustum] + np.pi / 4) / (np.pi / 6)) + 1).astype(np.int64)  # 1..3 by sector
    tokens = np.zeros((3, 16), np.float32)
    tokens[np.arange(3), seed * 3 + np.arange(3)] = 1
    return LabeledScan(key, pts, rng.random(4000).astype(np.float32), inst, tokens, in_frustum)


SCANS = [_scan(i, f"00_{i:06d}") for i in range(4)]
NO_AUG = {"rotate": False, "flip_x": 0, "flip_y": 0, "scale": [1, 1], "jitter_std": 0}


def _source(token: np.ndarray) -> tuple[int, int]:
    hot = int(np.argmax(token))
    return hot // 3, hot % 3 + 1


def test_crop_keeps_only_labeled_frustum():
    ds = DistillDataset(SCANS, DataConfig.from_dict({"franken_frustum": 1, "augment": NO_AUG}), seed=1)
    s = ds[2]
    assert len(s.points) == SCANS[2].in_frustum.sum()
    assert np.all(np.abs(np.arctan2(s.points[:, 1], s.points[:, 0])) < np.pi / 4)
    naive = DistillDataset(SCANS, DataConfig.from_dict({"crop": False, "franken_frustum": 1, "augment": NO_AUG}))[2]
    assert len(naive.points) == 4000 and (naive.instance == 0).sum() == (~SCANS[2].in_frustum).sum()


def test_franken_frustum_spreads_crops_and_keeps_tokens_aligned():
    ds = DistillDataset(SCANS, DataConfig.from_dict({"franken_frustum": 4, "augment": NO_AUG, "min_instance_points": 1}))
    s = ds[0]
    assert s.keys[0] == "00_000000" and len(s.keys) == 4
    # four 90-degree crops at 90-degree spacing: every quadrant of the circle holds points
    az = np.arctan2(s.points[:, 1], s.points[:, 0])
    assert np.histogram(az, bins=8, range=(-np.pi, np.pi))[0].min() > 0
    assert s.num_instances == 12 and set(np.unique(s.instance)) == set(range(1, 13))
    # every instance's points are the source instance's points (same count), its token the source token
    for i in range(1, 13):
        scan_i, inst_i = _source(s.tokens[i - 1])
        assert (s.instance == i).sum() == (SCANS[scan_i].instance == inst_i).sum()


def test_scan_mixing_and_subsampling():
    cfg = DataConfig.from_dict({"franken_frustum": 1, "mix_prob": 1.0, "augment": NO_AUG, "max_points": 1000})
    s = DistillDataset(SCANS, cfg, seed=3)[1]
    assert len(s.keys) == 2 and len(s.points) == 1000
    assert len(s.tokens) == len(np.unique(s.instance[s.instance > 0]))


def test_deterministic_by_seed_epoch_index():
    cfg = DataConfig.from_dict({"mix_prob": 0.5})
    a, b = DistillDataset(SCANS, cfg, seed=7), DistillDataset(SCANS, cfg, seed=7)
    np.testing.assert_array_equal(a[3].points, b[3].points)
    np.testing.assert_array_equal(a[3].instance, b[3].instance)
    b.set_epoch(1)
    assert not np.array_equal(a[3].points, b[3].points[: len(a[3].points)])


def test_augment_is_a_similarity():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(500, 3)).astype(np.float32)
    out = augment(pts, AugmentConfig(jitter_std=0), np.random.default_rng(5))
    d_in = np.linalg.norm(pts[1:] - pts[:-1], axis=1)
    d_out = np.linalg.norm(out[1:] - out[:-1], axis=1)
    ratio = d_out / d_in
    assert np.allclose(ratio, ratio[0], rtol=1e-4) and 0.95 <= ratio[0] <= 1.05
    np.testing.assert_allclose(out[:, 2] / pts[:, 2], ratio[0], rtol=1e-4)  # z only scales (rotation about z)
    assert azimuth_center(np.array([[1, 0.1, 0], [1, -0.1, 0]], np.float32)) == pytest.approx(0.0)


def test_bad_scans_rejected():
    s = SCANS[0]
    with pytest.raises(SensorDataError, match="in_frustum"):
        LabeledScan("bad", s.points, s.intensity, s.instance, s.tokens, s.in_frustum[:10])
    with pytest.raises(SensorDataError, match="tokens"):
        LabeledScan("bad", s.points, s.intensity, s.instance + 5, s.tokens, s.in_frustum)
    with pytest.raises(ValueError, match="unknown data settings"):
        DataConfig.from_dict({"frankenfrustum": 2})
