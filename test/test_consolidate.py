"""Time-based consolidation of semantic pseudo-labels (pseudolabel/consolidate.py): votes of a window of scans
registered by their poses, on a synthetic street (static ground with noisy labels, a moving object, a car that
drives off) and on the real semantickitti_mini scans with the noisy oracle teacher; files cached and resumable."""
import numpy as np
import pytest

from conftest import require_data
from sal_ros.core.errors import SensorDataError
from sal_ros.data.pseudolabels import SemanticLabels
from sal_ros.pseudolabel.consolidate import ConsolidationConfig, consolidate_folder, consolidate_scan

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
    from sal_ros.data.pseudolabels import load_semantic, save_semantic
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.score_sources import OracleScores
    from sal_ros.pseudolabel.semantic_labeler import SemanticConfig, SemanticLabeler

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
    from sal_ros.data.pseudolabels import load_semantic

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


def instance_scans():
    """Four scans from a sensor driving 1 m per scan: object A (a box of points) parked at (10, 3), object B driving
    0.5 m per scan at (20, -3), object C 1.5 m from A seen in scans 0 and 3 only. Per-scan instance ids in a
    shuffled order; tokens per scan: the object's direction plus noise."""
    from sal_ros.data.pseudolabels import PseudoLabels

    rng = np.random.default_rng(1)
    box = rng.uniform(0, 1.0, (200, 3))
    direction = {"A": np.eye(4)[0], "B": np.eye(4)[1], "C": np.eye(4)[2]}
    scans, truth = [], []
    for j in range(4):
        pose = np.eye(4)
        pose[0, 3] = float(j)
        objects = [("A", (10.0, 3.0)), ("B", (20.0 + 0.5 * j, -3.0))] + ([("C", (10.0, 4.5))] if j in (0, 3) else [])
        order = rng.permutation(len(objects))
        pts, inst, tokens = [], [], []
        for new_id, o in enumerate(order, start=1):
            name, (x, y) = objects[o]
            pts.append(box * [1.0, 1.0, 1.5] + [x - j, y, 0.0])
            inst.append(np.full(len(box), new_id))
            tokens.append(direction[name] + rng.normal(0, 0.1, 4))
        pts = np.concatenate(pts).astype(np.float32)
        pl = PseudoLabels(np.concatenate(inst), np.array(tokens), np.ones(len(order)), np.ones(len(order)),
                          np.ones(len(pts), bool), {"key": f"00_{j:06d}"})
        scans.append((pts, pose, pl))
        truth.append([objects[o][0] for o in order])
    return scans, truth


def test_instances_keep_one_id_and_one_token_across_the_window():
    from sal_ros.pseudolabel.consolidate import associate_instances

    scans, truth = instance_scans()
    after = associate_instances(scans, ConsolidationConfig(enabled=True, window=3, instance_voxel=0.3, instance_iou=0.2))
    ids = {}
    for pl, names in zip(after, truth):
        for row, name in enumerate(names):
            ids.setdefault(name, set()).add(pl.meta["track_ids"][row])
    assert all(len(v) == 1 for v in ids.values()), ids  # A parked, B driving, C seen again after two scans
    assert len({v.pop() for v in ids.values()}) == 3  # three objects, three ids (C stays apart from A)
    means = {}
    for (_, _, before), pl, names in zip(scans, after, truth):
        for row, name in enumerate(names):
            means.setdefault(name, []).append(before.tokens[row].astype(np.float32))
            assert (pl.instance == before.instance).all()  # the masks are the scan's own
    for pl, names in zip(after, truth):
        for row, name in enumerate(names):
            expected = np.mean(means[name], axis=0)
            assert np.allclose(pl.tokens[row], expected / np.linalg.norm(expected), atol=2e-3)
    # one scan apart only (window 1): C's two sightings, three scans apart, are two tracklets
    short = associate_instances(scans, ConsolidationConfig(enabled=True, window=1))
    c_ids = {pl.meta["track_ids"][names.index("C")] for pl, names in zip(short, truth) if "C" in names}
    assert len(c_ids) == 2


def test_oracle_mask_instances_of_a_real_sequence_associate():
    """semantickitti_mini 07 (parked rows), ground-truth segments as 2D masks, lifted per scan: the tracklet ids
    score a much higher S_assoc over the ten scans than the per-scan ids; per-scan PQ cannot move (same masks)."""
    from sal_ros.pseudolabel.consolidate import instance_study

    result = instance_study(require_data("semantickitti_mini", "sequences", "07"), ConsolidationConfig(enabled=True))
    s = result["s_assoc"]
    assert result["scans"] == 10 and result["gt_tubes"] >= 8
    assert s["tracklets"] > s["per scan"] + 0.2 and s["tracklets"] > 0.7


def test_pseudolabel_command_associates_instances_when_asked(tmp_path, capsys):
    """Instance pseudo-labels (SLIC masks, no tokens) of 3 scans, then --consolidate 1: tracklet ids written beside
    the per-scan masks; a second run finds them done."""
    import json

    from sal_ros.cli import main
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path

    seq = require_data("semantickitti_mini", "sequences", "10")
    args = ["pseudolabel", str(seq), "--masks", "slic", "--no-tokens", "--max-frames", "3", "--no-progress",
            "--out", str(tmp_path), "--consolidate", "1"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["consolidated"]["written"] == 3
    plain = load_pseudolabels(pseudolabel_path(tmp_path, "10_000001"))
    linked = load_pseudolabels(pseudolabel_path(tmp_path / "consolidated", "10_000001"))
    assert (linked.instance == plain.instance).all() and len(linked.meta["track_ids"]) == plain.num_instances
    ids = [load_pseudolabels(pseudolabel_path(tmp_path / "consolidated", f"10_00000{j}")).meta["track_ids"]
           for j in range(3)]
    assert set(ids[0]) & set(ids[1])  # some segment of scan 0 goes on in scan 1 under the same id
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["consolidated"]["skipped"] == 3
