"""Time-based consolidation of semantic pseudo-labels (pseudolabel/consolidate.py): votes of a window of scans
registered by their poses, on a synthetic street (static ground with noisy labels, a moving object, a car that
drives off) and on the real semantickitti_mini scans with the noisy oracle teacher; files cached and resumable."""
import numpy as np
import pytest

from conftest import require_data
from sal_ros.core.errors import SensorDataError
from sal_ros.pseudolabel.consolidate import ConsolidationConfig, consolidate_folder, consolidate_scan
from sal_ros.pseudolabel.semantic import SemanticLabels

NAMES = ["car", "road", "building"]
CAR, ROAD, BUILDING = 1, 2, 3


def labels(raw):
    raw = np.asarray(raw, np.uint16)
    n = raw.size
    return SemanticLabels(raw.copy(), raw, np.where(raw > 0, 0.8, 0), np.full(n, 0.3), np.zeros(n, np.uint8),
                          raw > 0, {"class_names": NAMES})


def street(t_changes=None):
    """Five scans from a sensor driving 1 m per scan along x. World: 20 ground points per voxel-sized cell on
    a 1 m grid (road); a block at (5, 10) that moves 3 m per scan; a car parked at (12, -5) in scans 0-2 (its lowest
    points), road there afterwards. Noise: in every scan a different 20 % of the road points read 'building'."""
    rng = np.random.default_rng(0)
    cells = np.array([(x + 0.5, y + 0.5, 0.1) for x in range(0, 20) for y in range(-3, 3)], np.float64)
    ground = np.repeat(cells, 20, axis=0) + rng.uniform(-0.05, 0.05, (len(cells) * 20, 3))
    block = np.array([[0.05, 10.05, 1.05]]) + rng.uniform(0, 0.1, (30, 3))
    car = np.array([[12.05, -4.95, 0.05]]) + rng.uniform(0, 0.1, (30, 3))
    scans = []
    for j in range(5):
        pose = np.eye(4)
        pose[0, 3] = float(j)
        world = [ground, block + [5.0 + 3 * j, 0, 0], car]
        raw = [np.where(rng.random(len(ground)) < 0.2, BUILDING, ROAD), np.full(30, BUILDING if j == 2 else ROAD),
               np.full(30, CAR if j < 3 else ROAD)]
        pts = np.concatenate(world) - pose[:3, 3]
        scans.append((pts.astype(np.float32), pose, labels(np.concatenate(raw))))
    return scans, len(ground)


def test_window_votes_fix_static_noise_and_leave_moving_points_alone():
    scans, n_ground = street()
    cfg = ConsolidationConfig(enabled=True, window=2, voxel=0.2, min_frames=2, min_agree=0.6)
    out = consolidate_scan(2, scans, cfg)
    ground = slice(0, n_ground)
    before = scans[2][2].raw_label[ground]
    assert (before == BUILDING).mean() > 0.15  # the noise is there
    assert (out.labels.label[ground] == ROAD).all() and out.decided[ground].all()  # 5 scans vote, ~80 % road
    block = slice(n_ground, n_ground + 30)
    # the moving block reads 'building' in this scan only, and no other scan has points where it is now
    assert (out.labels.label[block] == BUILDING).all() and not out.decided[block].any()
    car_place = slice(n_ground + 30, n_ground + 60)
    after = consolidate_scan(3, scans, cfg)  # window 1-4: the car in 1-2, road in 3-4
    assert (after.labels.label[car_place] == ROAD).all() and after.decided[car_place].all()  # cars never vote
    assert (out.labels.label[car_place] == CAR).all() and not out.decided[car_place].any()  # a car label stays
    meta = out.labels.meta["consolidated"]
    assert meta["changed"] == int((before == BUILDING).sum()) and meta["filled"] == 0


def test_disagreeing_votes_leave_a_point_alone_and_unseen_points_are_filled():
    scans, n_ground = street()
    cfg = ConsolidationConfig(enabled=True, window=2, min_agree=0.95)  # ~80 % road is not enough
    out = consolidate_scan(2, scans, cfg)
    assert not out.decided[:n_ground].any()
    assert (out.labels.label[:n_ground] == scans[2][2].raw_label[:n_ground]).all()
    pts, pose, lab = scans[2]
    raw = lab.raw_label.copy()
    raw[:100] = 0  # no camera saw these in scan 2
    unseen = (pts, pose, labels(raw))
    filled = consolidate_scan(2, [*scans[:2], unseen, *scans[3:]], ConsolidationConfig(enabled=True))
    assert (filled.labels.label[:100] == ROAD).all() and filled.labels.meta["consolidated"]["filled"] == 100
    kept_empty = consolidate_scan(2, [*scans[:2], unseen, *scans[3:]], ConsolidationConfig(enabled=True, fill=False))
    assert (kept_empty.labels.label[:100] == 0).all()


def test_noisy_oracle_labels_of_a_real_sequence_get_better():
    """semantickitti_mini 00, ten scans, oracle teacher with logit noise sigma 1.0: the points the window decides
    are far more often right than the per-scan labels, and every label together is better too."""
    from sal_ros.pseudolabel.consolidate import oracle_study

    result = oracle_study(require_data("semantickitti_mini", "sequences", "00"), 1.0, ConsolidationConfig(enabled=True))
    rows = result["rows"]
    assert result["scans"] == 10
    assert rows["per scan"]["acc_all"] < 60
    assert rows["consolidated"]["acc_all"] > rows["per scan"]["acc_all"] + 8
    assert rows["decided only"]["acc_kept"] > 95 and rows["decided only"]["kept_share"] > 40
    assert result["filled"] > 1000 and result["filled_acc"] > 90


def test_consolidated_files_are_cached_and_resumable(tmp_path):
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.pseudolabels import pseudolabel_path
    from sal_ros.pseudolabel.engine import FrameSource
    from sal_ros.pseudolabel.semantic import OracleScores, SemanticConfig, SemanticLabeler, load_semantic, save_semantic

    seq = require_data("semantickitti_mini", "sequences", "09")
    source = FrameSource(seq)
    labeler = SemanticLabeler(SemanticConfig(scores="oracle"), source, score_source=OracleScores("semantickitti"))
    plain = tmp_path / "plain"
    for frame in load_semantickitti(seq, [0, 1, 2]):
        save_semantic(pseudolabel_path(plain, frame.key), labeler.raw(frame))
    cfg = ConsolidationConfig(enabled=True)
    first = consolidate_folder(seq, plain, tmp_path / "out", cfg, progress=False)
    assert (first["scans"], first["written"], first["skipped"]) == (3, 3, 0)
    again = consolidate_folder(seq, plain, tmp_path / "out", cfg, progress=False)
    assert (again["written"], again["skipped"]) == (0, 3)
    done = load_semantic(pseudolabel_path(tmp_path / "out", "09_000001"))
    assert done.meta["consolidation_hash"] == cfg.config_hash() and done.meta["consolidation"]["scans"] == [0, 1, 2]
    with pytest.raises(SensorDataError, match="another configuration"):
        consolidate_folder(seq, plain, tmp_path / "out", ConsolidationConfig(enabled=True, voxel=0.3), progress=False)


def test_pseudolabel_command_consolidates_when_asked(tmp_path, capsys):
    import json

    from sal_ros.cli import main
    from sal_ros.data.pseudolabels import pseudolabel_path
    from sal_ros.pseudolabel.semantic import load_semantic

    seq = require_data("semantickitti_mini", "sequences", "10")
    args = ["pseudolabel", str(seq), "--semantic", "--scores", "oracle", "--max-frames", "3", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert "consolidated" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # off by default
    assert not (tmp_path / "consolidated").exists()
    assert main([*args, "--consolidate", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["skipped"], report["consolidated"]["written"]) == (3, 3)
    done = load_semantic(pseudolabel_path(tmp_path / "consolidated", "10_000001"))
    assert done.meta["consolidation"]["window"] == 1 and done.meta["consolidated"]["decided"] > 0
